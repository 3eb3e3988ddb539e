"""Host (Python) time per call of a compiled any4 decode step, where no CUDA graph of our own hides it.

    cd benchmarks && python profile_host.py [--layers 32] [--modes default] [--bf16]

bench_generate.py captures the compiled step in a CUDA graph, so it measures the GPU only. A user
calling the compiled model each step also pays dynamo's guards and AOT autograd's wrappers on the
host, and these visit every Any4Tensor weight (metadata guard, subclass unwrapping). Per mode:
wall time per call of back-to-back calls (the GPU step time when the host keeps up, the host time
when it does not), the GPU time of one step (CUDA events around a synchronised call), and the
host time spent in Any4Tensor.__tensor_flatten__, with its fast version and with torchao's generic
one (swapped in at run time: the guards look the method up on every call).
--top N also prints cProfile's top functions by own time (this is how the wrap_triton launch
overhead in kernels/launch.py._launcher was found).
Model: Llama-3-8B config with random weights (bench_generate.build), batch 1, KV length 640;
--bf16 leaves it unquantized (the baseline).
Run one mode per process: reduce-overhead right after default mode in the same process ends in a
device-side assert ("index out of bounds: 0 <= tmp7 < 640" in an inductor indexing kernel, the
KV-cache length) for the bf16 model as well (--bf16, 2 layers; any4 at 2 and 32 layers; H100,
torch 2.11, transformers 5.17), so it is not any4's; each mode alone runs. A failing mode is reported, not fatal.
"""

import argparse
import cProfile
import json
import pstats
import sys

import torch
from bench_generate import build, time_cuda  # noqa: E402  (same directory)
from bench_kernels import wall_us_per_call  # noqa: E402
from torchao.utils import TorchAOBaseTensor

from any4ao import Any4Tensor, Any4WeightOnlyConfig, quantize_model


def per_call_ms(fn, calls=30):
    return wall_us_per_call(fn, calls) / 1e3


def flatten_ms(fn, calls=10, top=0):
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof)
    if top:
        stats.sort_stats("tottime").print_stats(top)
    return sum(v[3] for k, v in stats.stats.items() if k[2] == "__tensor_flatten__") / calls * 1e3


def run_mode(model, token, cache, pos, mode, top):
    """Rows for one compile mode, with the fast and the generic __tensor_flatten__."""
    fast = Any4Tensor.__tensor_flatten__
    rows = []
    torch._dynamo.reset()
    step = torch.compile(
        lambda: model(input_ids=token, past_key_values=cache, cache_position=pos, use_cache=True).logits,
        fullgraph=True,
        mode=None if mode == "default" else mode,
    )
    for _ in range(5):
        step()
    for flatten in ("fast", "torchao generic"):
        Any4Tensor.__tensor_flatten__ = fast if flatten == "fast" else TorchAOBaseTensor.__tensor_flatten__
        per_call_ms(step, 5)
        row = dict(
            mode=mode,
            tensor_flatten=flatten,
            wall_ms_per_call=per_call_ms(step),
            gpu_ms_per_step=time_cuda(step, 10),
            tensor_flatten_ms_per_call=flatten_ms(step, top=top if flatten == "fast" else 0),
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    Any4Tensor.__tensor_flatten__ = fast
    return rows


@torch.no_grad()
def main():
    from transformers import StaticCache

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--modes", default="default", help="comma-separated; one per process is safer (module docstring)")
    p.add_argument("--top", type=int, default=0, help="also print the top functions by own time (cProfile)")
    p.add_argument("--bf16", action="store_true", help="leave the model in bf16 (the baseline)")
    args = p.parse_args()
    model, config = build("llama3-8b", args.layers)
    if not args.bf16:
        quantize_model(model, Any4WeightOnlyConfig(group_size=128), progress=False, calibration="none")  # speed only
    cache = StaticCache(config=config, max_cache_len=640)
    model(
        input_ids=torch.randint(0, config.vocab_size, (1, 512), device="cuda"),
        past_key_values=cache,
        cache_position=torch.arange(512, device="cuda"),
        use_cache=True,
    )
    token = torch.randint(0, config.vocab_size, (1, 1), device="cuda")
    pos = torch.tensor([639], device="cuda")
    rows = []
    for mode in args.modes.split(","):
        try:
            rows += run_mode(model, token, cache, pos, mode, args.top)
        except Exception as e:  # reported, not fatal: the other mode still runs
            print(json.dumps({"mode": mode, "error": repr(e)[:500]}), flush=True)
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "command": " ".join(sys.argv),
                "layers": args.layers,
                "any4": not args.bf16,
            }
        )
    )


if __name__ == "__main__":
    main()
