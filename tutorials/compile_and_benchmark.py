"""Tutorial: torch.compile a quantized model and time it against its unquantized original.

any4's matmuls are torch.library custom ops (Triton kernels on CUDA, a dequantize + matmul
reference on CPU), so the quantized model compiles with fullgraph=True: a graph break would
raise. dynamic=True: prompts of every length share one graph. On CUDA the compiled model also
runs with mode="reduce-overhead" (CUDA graphs), which is what makes batch-1 decode fast. On
large models check the host time per call too: for an any4 Llama-3-8B on an H100 host the
CUDA-graph trees took 5.5 ms of Python per call, about the whole GPU step (bench_generate.py
therefore captures the compiled step in a plain torch.cuda.CUDAGraph instead).

    python tutorials/compile_and_benchmark.py             # SmolLM2-135M (CUDA if available)
    python tutorials/compile_and_benchmark.py --tiny      # a tiny random Llama (what CI runs)
Prints eager vs compiled latency for a prefill and a one-token step; real kernel numbers come
from benchmarks/bench_kernels.py and bench_generate.py on a GPU.
"""

import argparse
import copy
import statistics
import time

import torch

import any4ao
from any4ao import any4_weight_only


def load(tiny: bool, device, dtype):
    if tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        return LlamaForCausalLM(cfg).to(device, dtype).eval()
    from any4ao.models import load_causal_lm

    return load_causal_lm(dtype=dtype)[0].to(device)


def median_ms(fn, device, reps):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    original = load(args.tiny, device, dtype)
    model = copy.deepcopy(original)
    # No tokenizer: quantize_model calibrates on 600 seeded random token ids (with text: see
    # quantize_and_generate.py). default_filter skips lm_head.
    any4ao.quantize_model(model, any4_weight_only(group_size=64), filter_fn=any4ao.default_filter, progress=False)

    torch.compiler.reset()
    mode = "reduce-overhead" if device.type == "cuda" else None
    compiled = torch.compile(model, fullgraph=True, dynamic=True, mode=mode)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt), device=device)
    token = prompt[:, :1]

    def run(m, ids):
        return m(ids, use_cache=False).logits

    # Compiled must match eager (same kernels, different fusion around them).
    eager_out, compiled_out = run(model, prompt), run(compiled, prompt)
    rel = ((compiled_out.float() - eager_out.float()).norm() / eager_out.float().norm()).item()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert rel < tol, f"compiled differs from eager: relative error {rel:.2e}"
    run(compiled, prompt[:, : args.prompt // 2 + 1])  # another length: must reuse the dynamic graph

    rows = []
    for name, m in (("original", original), ("any4 eager", model), ("any4 compiled", compiled)):
        for what, ids in (("prefill", prompt), ("1 token", token)):
            run(m, ids)  # warm-up (compiles / captures on first use)
            rows.append((name, what, median_ms(lambda: run(m, ids), device, args.reps)))
    print(f"device {device}, dtype {dtype}, compiled vs eager relative error {rel:.2e}")
    print(f"{'model':16s} {'input':10s} {'median ms':>10s}")
    for name, what, ms in rows:
        print(f"{name:16s} {what:10s} {ms:10.2f}")
    return rel, rows


if __name__ == "__main__":
    main()
