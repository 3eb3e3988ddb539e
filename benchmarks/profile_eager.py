"""Host (Python) time of one eager F.linear on an Any4Tensor, next to bf16 and torchao int4, and where
it goes (cProfile, top functions by own time).

    python benchmarks/profile_eager.py [--shape 4096x4096] [--ms 1,128] [--calls 2000] [--top 25] [--ops 25] [--out DIR]

Each call's kernel is far shorter than its Python, so back-to-back calls run at the host's pace:
wall time / calls is the host time per call (the GPU time is printed beside it, from one CUDA-graph
replay, to show the kernel is not what is measured). This is what an eager loop, or a compiled step
without CUDA graphs, pays per quantized linear.
"""

import argparse
import cProfile
import io
import pstats

import torch
import torch.nn.functional as F
from bench_kernels import GROUP, graph_time_us, result_meta, wall_us_per_call, write_rows
from sweep_gemm import torchao_int4

from any4ao import Any4Tensor
from any4ao.kernels import ops  # noqa: F401  (registers torch.ops.any4ao.*)


def host_us(call, calls):
    for _ in range(20):  # warm-up: compiles, caches
        call()
    return wall_us_per_call(call, calls)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="4096x4096")
    p.add_argument("--ms", default="1,128")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default="")
    p.add_argument(
        "--ops",
        type=int,
        default=0,
        help="also a torch.profiler table (CPU and CUDA activity) of the top N ops and runtime calls by own "
        "CPU time per any4 call: where cProfile cannot look (allocation, launches, device queries)",
    )
    args = p.parse_args()
    n, k = (int(v) for v in args.shape.split("x"))
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    weights = {"bf16": w, "any4": Any4Tensor.from_hp(w, group_size=GROUP, kmeans_iterations=2)}
    try:
        weights["torchao int4"] = torchao_int4(w, 1)[0]
    except Exception as e:  # reported, not fatal (torchao_int4 returns None without torchao)
        print(f"torchao int4 unavailable: {e!r}")
    rows = []
    print("| M | weight | host us per call | GPU us per call |")
    print("|---|---|---|---|")
    for m in (int(v) for v in args.ms.split(",")):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for name, weight in weights.items():
            call = lambda weight=weight: F.linear(x, weight)  # noqa: E731
            host = host_us(call, args.calls)
            gpu = graph_time_us([call], 20)
            rows.append({"M": m, "weight": name, "host_us": host, "gpu_us": gpu})
            print(f"| {m} | {name} | {host:.1f} | {gpu:.1f} |", flush=True)
        if args.top:
            profile = cProfile.Profile()
            call = lambda: F.linear(x, weights["any4"])  # noqa: E731
            profile.enable()
            for _ in range(args.calls):
                call()
            profile.disable()
            torch.cuda.synchronize()
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.top)
            print(f"\nany4 M={m}: top {args.top} functions by own time over {args.calls} calls")
            print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:6000])
        if args.ops:
            rows.append({"M": m, "weight": "any4", "ops": op_table(lambda: F.linear(x, weights["any4"]), args)})
    if args.out:
        write_rows(args.out, "profile-eager", result_meta(shape=args.shape, calls=args.calls), rows)


def op_table(call, args):
    """Own CPU time per call of each op / runtime call under torch.profiler, top args.ops, printed and
    returned. The profiler adds its own cost per event: compare rows, not totals with host_us."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.calls):
            call()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[: args.ops]
    table = [
        {
            "name": e.key,
            "calls_per_call": e.count / args.calls,
            "self_cpu_us_per_call": e.self_cpu_time_total / args.calls,
        }
        for e in events
    ]
    print(f"\nany4: top {args.ops} ops by own CPU time per call (torch.profiler, {args.calls} calls)")
    for r in table:
        print(f"  {r['self_cpu_us_per_call']:8.2f} us  x{r['calls_per_call']:.1f}  {r['name']}")
    return table


if __name__ == "__main__":
    main()
