"""Where the decode step's time goes: GPU time per kernel of one compiled Llama decode step.

    python benchmarks/profile_generate.py [--layers 4] [--batch 1] [--methods bf16,torchao-int4,any4] [--out DIR]

The model and step are bench_generate.py's (Llama-3-8B config, random weights, static KV cache at
length 640, torch.compile(fullgraph)); --layers cuts the depth (the per-layer kernels repeat, so
their share scales with it; the embedding and lm_head do not). Per method: the step's time in a
CUDA graph (as bench_generate measures it) and, from torch.profiler over 5 steps run without a
graph, each kernel's GPU time per step. The gap between the two is launch overhead that the graph
removes plus the idle time between kernels. Writes profile-generate-<gpu>.{json,md}.
"""

import argparse
import copy
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from bench_generate import build, measure  # noqa: E402  (same directory)
from bench_kernels import result_meta

from any4ao import Any4WeightOnlyConfig, quantize_model


def quantize(model, method):
    if method == "any4":
        quantize_model(model, Any4WeightOnlyConfig(group_size=128), progress=False, calibration="none")  # speed only
    elif method == "torchao-int4":
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        quantize_(
            model,
            Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"),
            filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and not fqn.endswith("lm_head"),
        )


@torch.no_grad()
def kernel_times(model, config, batch, steps=5):
    """GPU microseconds per step for each kernel name of the compiled decode step."""
    from transformers import StaticCache

    cache = StaticCache(config=config, max_cache_len=640)
    prompt = torch.randint(0, config.vocab_size, (batch, 512), device="cuda")
    model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(512, device="cuda"), use_cache=True)
    token = torch.randint(0, config.vocab_size, (batch, 1), device="cuda")
    pos = torch.tensor([639], device="cuda")
    torch._dynamo.reset()
    step = torch.compile(
        lambda: model(input_ids=token, past_key_values=cache, cache_position=pos, use_cache=True).logits, fullgraph=True
    )
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    per_name, calls = defaultdict(float), defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_name[e.name] += e.device_time_total / steps
            calls[e.name] += 1
    return {name: (us, calls[name] // steps) for name, us in per_name.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--methods", default="bf16,torchao-int4,any4")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    gpu = torch.cuda.get_device_name()
    base, config = build("llama3-8b", args.layers)
    rows, lines = (
        [],
        [
            f"`{' '.join(sys.argv)}`",
            "",
            f"{gpu}, torch {torch.__version__}, triton {__import__('triton').__version__}; llama3-8b config, "
            f"{args.layers} layers, random weights, batch {args.batch}, KV length 640; torch.compile(fullgraph)",
            "",
        ],
    )
    for method in args.methods.split(","):
        model = base if method == "bf16" else copy.deepcopy(base)
        quantize(model, method)
        _, graph_ms = measure(model, config, args.batch, compiled=True)
        kernels = kernel_times(model, config, args.batch)
        total_us = sum(us for us, _ in kernels.values())
        rows.append(
            dict(
                method=method,
                graph_step_ms=graph_ms,
                kernel_sum_ms=total_us / 1e3,
                kernels={n: dict(us_per_step=us, calls_per_step=c) for n, (us, c) in kernels.items()},
            )
        )
        lines += [
            f"## {method}: step {graph_ms * 1e3:.0f} us in a CUDA graph; kernels sum to {total_us:.0f} us",
            "",
            "| kernel | calls / step | us / step | share |",
            "|---|---|---|---|",
        ]
        for name, (us, c) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[: args.top]:
            lines.append(f"| `{name[:90]}` | {c} | {us:.1f} | {us / total_us:.1%} |")
        lines.append("")
        print("\n".join(lines[-args.top - 4 :]), flush=True)
        if model is not base:
            del model
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"profile-generate-{gpu.replace(' ', '-')}-b{args.batch}"
    meta = result_meta(
        layers=args.layers,
        batch=args.batch,
        weights="random",
    )
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
