"""How long quantization takes: every linear layer of Llama-3-8B's shapes, on one GPU.

    python benchmarks/bench_quantize.py [--blocks 32] [--methods int4,nf4,any4,any4+cal,any4+gptq]

Per decoder block: q 4096x4096, k and v 1024x4096, o 4096x4096, gate and up 14336x4096, down
4096x14336 (7.0e9 weights over 32 blocks). Weights are random bf16 (time does not depend on the
values much; quality is measured by `any4ao eval`), made fresh for every layer outside the
timed region. The calibration statistics are random too: per-channel mean x^2 and, for
any4+gptq, E[x x^T] of 2048 random tokens per input width, made before timing (recording them in
a real forward is not timed here). Timed: `Any4Tensor.from_hp` per layer, synchronised, summed.
Before timing, on a smaller problem, the fused Lloyd kernel is checked against the torch loop
and any4's per-row weighted error against int4 / nf4 / fp4 (never above, by construction).
Writes benchmarks/results/quantize-time-<gpu>.{json,md}.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import triton

from any4ao import Any4Tensor, Any4WeightOnlyConfig
from any4ao.codebooks.gptq import dequantize_codes
from any4ao.codebooks.kmeans import lloyd_max
from any4ao.codebooks.refine import real_domain_error

SHAPES = {
    "q_proj": (4096, 4096),
    "k_proj": (1024, 4096),
    "v_proj": (1024, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096),
    "up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}
METHODS = {
    "int4": dict(codebook="int4"),
    "nf4": dict(codebook="nf4"),
    "any4": dict(codebook="any4"),
    "any4+cal": dict(codebook="any4"),
    "any4+gptq": dict(codebook="any4", error_feedback="gptq"),
}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def statistics_for(k: int, device, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(2048, k, device=device, generator=g) * (torch.rand(k, device=device, generator=g) * 2 + 0.1)
    hessian = x.T @ x / x.shape[0]
    return torch.diagonal(hessian).clone(), hessian


def checks(device, rows=512, k=4096) -> dict:
    """The fused Lloyd loop against the torch loop, and any4 against the fixed grids, on GPU."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, k, device=device, generator=g)
    w = torch.rand(rows, k, device=device, generator=g)
    init = torch.linspace(-2, 2, 16, device=device).repeat(rows, 1)
    out = {}
    fused, plain = lloyd_max(x, w, init, 10, fused=True), lloyd_max(x, w, init, 10, fused=False)

    def err(r):
        return (w.double() * (x - torch.gather(r.centroids, 1, r.codes)).double().square()).sum(1)

    out["lloyd_fused_vs_torch_max_rel_err_diff"] = float(((err(fused) - err(plain)).abs() / err(plain)).max())
    weight = torch.randn(2 * rows, k, device=device, generator=g).bfloat16()
    cw, _ = statistics_for(k, device, 1)
    errors = {}
    for name in ("int4", "nf4", "fp4", "any4"):
        t = Any4Tensor.from_hp(weight, Any4WeightOnlyConfig(codebook=name), cw)
        w_hat = dequantize_codes(t.codes(), t.lut.float(), t.scale.float(), t.zero_point.float(), 128)
        errors[name] = ((weight.double() - w_hat.double()).square() * cw.double()).sum(1)
    worst = torch.stack([errors["int4"], errors["nf4"], errors["fp4"]]).amin(0)
    out["any4_rows_worse_than_best_grid"] = int((errors["any4"] > worst * (1 + 1e-6)).sum())
    out["any4_mean_err_over_best_grid"] = float((errors["any4"] / worst).mean())
    # the fused per-row error (CUDA) against the torch float64 version the CPU runs
    codes = torch.randint(0, 16, x.shape, device=device, generator=g)
    s = torch.rand(rows, k // 128, device=device, generator=g) + 0.1
    z = torch.randn(rows, k // 128, device=device, generator=g)
    fused = real_domain_error(x, cw[None], s, z, init, codes, 128)
    w_hat = torch.gather(init.double(), 1, codes) * s.double().repeat_interleave(128, 1) + z.double().repeat_interleave(
        128, 1
    )
    plain = (cw.double()[None] * (x.double() - w_hat).square()).sum(1)
    out["row_error_fused_vs_torch_max_rel_diff"] = float(((fused - plain).abs() / plain).max())
    return out


def profile(device, shape, stats, args) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    n, k = shape
    w = (torch.randn(n, k, device=device) * 0.02).bfloat16()
    cw, hessian = stats[k]
    for method in args.methods.split(","):
        config = Any4WeightOnlyConfig(group_size=args.group_size, **METHODS[method])
        h = hessian if method == "any4+gptq" else None
        Any4Tensor.from_hp(w, config, cw if "+" in method else None, hessian=h)  # warm-up (Triton compiles)
        sync(device)
        t0 = time.perf_counter()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            Any4Tensor.from_hp(w, config, cw if "+" in method else None, hessian=h)
            sync(device)
        print(f"== {method} {n}x{k}: {time.perf_counter() - t0:.3f} s (profiled)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=32)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table per method (one gate_proj)")
    p.add_argument("--shrink", type=int, default=1, help="divide every shape by this (a CPU smoke test of the script)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.shrink == 1 else "cpu")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu-smoke"
    shapes = {name: (n // args.shrink, k // args.shrink) for name, (n, k) in SHAPES.items()}
    check = checks(device, 512 // args.shrink, 4096 // args.shrink)
    print("checks:", check, flush=True)
    stats = {k: statistics_for(k, device, k) for k in sorted({k for _, k in shapes.values()})}
    if args.profile:
        profile(device, shapes["gate_proj"], stats, args)
        return None
    rows = []
    for method in args.methods.split(","):
        overrides = METHODS[method]
        config = Any4WeightOnlyConfig(group_size=args.group_size, **overrides)
        per_layer = {name: 0.0 for name in SHAPES}
        weights = 0
        for block in range(args.blocks):
            for name, (n, k) in shapes.items():
                g = torch.Generator(device=device).manual_seed(block * 100 + len(name))
                w = (torch.randn(n, k, device=device, generator=g) * 0.02).bfloat16()
                cw, hessian = stats[k] if method in ("any4+cal", "any4+gptq") else (None, None)
                sync(device)
                t0 = time.perf_counter()
                Any4Tensor.from_hp(w, config, cw, hessian=hessian if method == "any4+gptq" else None)
                sync(device)
                per_layer[name] += time.perf_counter() - t0
                weights += n * k
                del w
        total = sum(per_layer.values())
        rows.append({"method": method, "seconds": total, "weights": weights, "per_layer_s": per_layer})
        print(f"{method:10s} {total:8.2f} s  ({weights / 1e9:.2f}e9 weights, {args.blocks} blocks)", flush=True)
    result = {
        "command": "python benchmarks/bench_quantize.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": gpu,
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()},
        "group_size": args.group_size,
        "blocks": args.blocks,
        "checks": check,
        "rows": rows,
    }
    if args.shrink != 1:
        return result
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"quantize-time-{gpu.replace(' ', '-')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# Quantization time, Llama-3-8B linear shapes x {args.blocks} blocks, {gpu}",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}, group {args.group_size}, bf16 weights.",
        "",
        "| method | seconds | " + " | ".join(SHAPES) + " |",
        "|---|---|" + "---|" * len(SHAPES),
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['seconds']:.2f} | " + " | ".join(f"{r['per_layer_s'][n]:.2f}" for n in SHAPES) + " |"
        )
    lines += ["", f"Checks on the GPU: {check}"]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
