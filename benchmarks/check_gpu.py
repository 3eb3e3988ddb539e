"""GPU checks of the model path (run by hand on a CUDA machine; CI covers the CPU path):

    python benchmarks/check_gpu.py [--out DIR]

1. torch.compile(fullgraph=True) of a quantized Llama (Triton LUT kernels inside) matches eager,
   with one graph for every prompt length > 1 (dynamic=True; length 1 is specialised by dynamo
   as usual), in default, reduce-overhead (CUDA graphs) and max-autotune modes; and with static
   shapes (one graph per length).
2. k-means throughput: seconds to quantize 1.07e9 weights with the default any4 settings.
3. The decode kernels (lut_linear at M <= 16) against float64 on fresh random weights, with
   NaN-poisoned outputs, over bf16/fp16, 3/4-bit codes, groups 32-256, ragged N and M 1..32; also
   which kernel the dispatcher took (decode-mma wherever mma_applies holds).
Prints a summary and writes check-gpu-<gpu>.json.
"""

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch
from bench_kernels import result_meta

from any4ao import Any4Tensor, Any4WeightOnlyConfig, quantize_model
from any4ao.kernels import ops  # noqa: F401  (registers torch.ops.any4ao.*, which section 3 calls)


def small_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    quantize_model(model, Any4WeightOnlyConfig(group_size=128), progress=False)
    return model


@torch.no_grad()
def check_compile(model, mode):
    torch.compiler.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, mode=mode)
    worst = 0.0
    start = time.perf_counter()
    for length in (7, 33, 130, 257):  # crosses the M thresholds of the kernel dispatcher
        ids = torch.randint(0, 4096, (2, length), device="cuda")
        eager = model(ids, use_cache=False).logits.float()
        for _ in range(2):  # reduce-overhead records the graph on a later call
            out = compiled(ids, use_cache=False).logits.float()
        worst = max(worst, ((out - eager).norm() / eager.norm()).item())
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return {
        "mode": mode or "default",
        "rel_err_vs_eager": worst,
        "unique_graphs": graphs,
        "seconds": time.perf_counter() - start,
        "ok": worst < 2e-2 and graphs == 1,
    }


@torch.no_grad()
def check_compile_static(model, mode):
    """Static shapes (dynamic=False, as a decode loop compiles): each length is its own graph;
    M = 2, 14, 66, 260 reach lut_mma, lut_gemm and dequantize + mm."""
    torch.compiler.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False, mode=mode)
    worst, start = 0.0, time.perf_counter()
    for length in (1, 7, 33, 130):
        ids = torch.randint(0, 4096, (2, length), device="cuda")
        eager = model(ids, use_cache=False).logits.float()
        for _ in range(2):
            out = compiled(ids, use_cache=False).logits.float()
        worst = max(worst, ((out - eager).norm() / eager.norm()).item())
    return {
        "mode": (mode or "default") + ", static shapes",
        "rel_err_vs_eager": worst,
        "seconds": time.perf_counter() - start,
        "ok": worst < 2e-2,
    }


def kmeans_throughput():
    rows, k, reps = 8192, 4096, 32  # 32 layers of 8192 x 4096 = 1.07e9 weights
    config = Any4WeightOnlyConfig()
    w = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    Any4Tensor.from_hp(w[:256], group_size=128)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        Any4Tensor.from_hp(w, config)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "weights": rows * k * reps,
        "seconds": seconds,
        "seconds_per_1e9": seconds / (rows * k * reps / 1e9),
        "settings": f"group {config.group_size}, {config.kmeans_iterations} iterations, "
        f"{config.refine_rounds} refine rounds, {config.scaling.value} scaling",
    }


def check_decode_kernels():
    from any4ao.kernels import launch, selector

    rows = []
    saved = launch._empty
    launch._empty = lambda shape, device, dtype: torch.full(shape, float("nan"), device=device, dtype=dtype)
    try:
        for dtype in (torch.bfloat16, torch.float16):
            for nbits, group, n, k in [
                (4, 128, 4096, 4096),
                (4, 64, 1544, 576),
                (3, 128, 1000, 1024),
                (4, 32, 200, 768),
                (4, 256, 4104, 2048),
                (4, 96, 300, 576),
            ]:
                w = torch.randn(n, k, device="cuda", dtype=dtype) * 0.02
                q = Any4Tensor.from_hp(w, codebook=f"any{nbits}", group_size=group, kmeans_iterations=2)
                w64 = q.dequantize(torch.float64)
                for m in (1, 3, 8, 9, 16, 20, 32, 33, 64):
                    x = torch.randn(m, k, device="cuda", dtype=dtype)
                    y = torch.ops.any4ao.lut_linear(x, q.qdata, q.lut, q.scale, q.zero_point, nbits, group)
                    ref = x.double() @ w64.t()
                    err = ((y.double() - ref).norm() / ref.norm()).item()
                    config = selector.choose(x, q.qdata, q.lut, q.scale, q.zero_point, nbits, group)
                    kind = "dequantize+mm" if config is None else f"lut_mma {config}"
                    rows.append(
                        {
                            "dtype": str(dtype),
                            "nbits": nbits,
                            "group": group,
                            "N": n,
                            "K": k,
                            "M": m,
                            "kernel": kind,
                            "rel_err": err,
                            "ok": bool(err < 1e-2),
                        }
                    )
    finally:
        launch._empty = saved
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--modes", default="default,reduce-overhead,max-autotune", help='comma-separated, or "none"')
    args = p.parse_args()
    gpu = torch.cuda.get_device_name()
    result = result_meta(compile=[])
    model = small_llama()
    modes = [] if args.modes == "none" else args.modes.split(",")
    for mode in modes:
        try:
            row = check_compile(model, None if mode == "default" else mode)
        except Exception as e:
            row = {"mode": mode, "ok": False, "error": "".join(traceback.format_exception_only(e))[-500:]}
        result["compile"].append(row)
        print(json.dumps(row), flush=True)
        try:
            row = check_compile_static(model, None if mode == "default" else mode)
        except Exception as e:
            row = {
                "mode": mode + ", static shapes",
                "ok": False,
                "error": "".join(traceback.format_exception_only(e))[-500:],
            }
        result["compile"].append(row)
        print(json.dumps(row), flush=True)
    result["kmeans"] = kmeans_throughput()
    print(json.dumps(result["kmeans"]), flush=True)
    result["decode_kernels"] = check_decode_kernels()
    bad = [r for r in result["decode_kernels"] if not r["ok"]]
    kinds = sorted({r["kernel"] for r in result["decode_kernels"]})
    errs = [r["rel_err"] for r in result["decode_kernels"]]
    print(
        f"decode kernels: {len(errs) - len(bad)}/{len(errs)} ok, kernels {kinds}, "
        f"rel err {min(errs):.1e}..{max(errs):.1e}",
        flush=True,
    )
    for r in bad:
        print("  FAIL", json.dumps(r), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if modes else "-no-compile"  # --modes none: k-means and the decode kernels only
    (out / f"check-gpu-{gpu.replace(' ', '-')}{suffix}.json").write_text(json.dumps(result, indent=2))
    if not all(r["ok"] for r in result["compile"] + result["decode_kernels"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
