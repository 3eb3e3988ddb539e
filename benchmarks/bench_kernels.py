"""any4 LUT kernels vs bf16 cuBLAS, torchao int4, gemlite int4 and naive dequant+mm, side by side.

    python benchmarks/bench_kernels.py [--out DIR] [--quick]

For every N x K and M: first a correctness check of any4 against a float64 reference on fresh
random inputs (outputs NaN-poisoned), then timing. Each method's weights are replicated so that
one CUDA-graph replay walks through more than 3x the L2 cache (every call streams its weight from
HBM); the time per call is the median over replays divided by the copies. Writes
kernels-<gpu>.json, kernels-<gpu>.md and kernels-<gpu>.png.
"""

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

import any4ao
from any4ao import Any4Tensor
from any4ao.kernels import launch, selector

SHAPES = [(4096, 4096), (6144, 4096), (14336, 4096), (4096, 14336), (28672, 4096), (8192, 8192)]
MS = [1, 4, 16, 32, 64, 256, 2048, 8192]
GROUP = 128
SWEEP_MS = [1, 32, 64, 256]
SWEEP_SHAPES = [(4096, 4096), (28672, 4096), (8192, 8192)]
L2_BYTES = 50 * 2**20


def result_meta(**extra) -> dict:
    """What every GPU result file starts with: the device, the versions and the command; then extra."""
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "any4ao": any4ao.__version__,
        "command": " ".join(sys.argv),
        **extra,
    }


def write_rows(out_dir, name: str, meta: dict, rows: list) -> Path:
    """out_dir/<name>-<device>.json holding {"meta": meta, "rows": rows}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{meta['device'].replace(' ', '-')}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return path


def wall_us_per_call(fn, calls):
    """Wall time of `calls` back-to-back calls, synchronised at both ends, per call (host-bound
    when each call's kernels are shorter than its Python)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def graph_time_us(calls, replays=20):
    """Median time of one call, from CUDA-graph replays of all `calls` back to back."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(calls))
    del graph
    return statistics.median(times)


def copies_for(bytes_per_copy):
    return max(2, min(64, math.ceil(3 * L2_BYTES / bytes_per_copy)))


def tensor_bytes(t):
    if isinstance(t, Any4Tensor):
        return t.storage_bytes()
    return t.numel() * t.element_size()


def rotated_any4(n: int, k: int):
    """A bf16 (N, K) weight and its any4 quantization (group GROUP), each replicated past L2 for
    graph_time_us, and the quantized weight in float64 for references: (w, q, w_copies, q_copies, w64)."""
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    q = Any4Tensor.from_hp(w, group_size=GROUP)
    q_copies = [q] + [q.clone() for _ in range(copies_for(q.storage_bytes()) - 1)]
    w_copies = [w] + [w.clone() for _ in range(copies_for(w.numel() * 2) - 1)]
    return w, q, w_copies, q_copies, q.dequantize(torch.float64)


def rel_err(y, ref) -> float:
    """‖y - ref‖ / ‖ref‖ against a float64 reference; NaN if y has any NaN (an unwritten element of a
    NaN-poisoned output)."""
    if torch.isnan(y).any():
        return float("nan")
    return ((y.double() - ref).norm() / ref.norm()).item()


def reference_times(x, q_copies, w_copies):
    """(F.linear on the Any4Tensor as the selector routes it, dequantize + mm, bf16 cuBLAS) in us,
    each over rotated copies (graph_time_us): the baselines every kernel check times beside its own."""
    from any4ao.kernels.launch import dequantize_then_mm

    today = graph_time_us([lambda c=c: F.linear(x, c) for c in q_copies])
    dq = graph_time_us(
        [lambda c=c: dequantize_then_mm(x, c.qdata, c.lut, c.scale, c.zero_point, 4, GROUP) for c in q_copies]
    )
    bf = graph_time_us([lambda w_=w_: F.linear(x, w_) for w_ in w_copies])
    return today, dq, bf


def check_any4(w_q, m, k, dtype, poison):
    """Relative error of the any4 kernel path vs float64, NaN-poisoned outputs."""
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    ref = x.double() @ w_q.dequantize(torch.float64).t()
    with poison():
        out = F.linear(x, w_q)
    torch.cuda.synchronize()
    return rel_err(out, ref)


class Poison:
    def __enter__(self):
        self.saved = launch._empty
        launch._empty = lambda shape, device, dtype: torch.full(shape, float("nan"), device=device, dtype=dtype)

    def __exit__(self, *exc):
        launch._empty = self.saved


class SkipMethod(Exception):
    pass


def make_methods(n, k, dtype, include):
    """name -> (list of weight objects (rotated copies), fn(x, w))."""
    w = torch.randn(n, k, device="cuda", dtype=dtype) * 0.02
    methods = {}
    start = time.perf_counter()
    q = Any4Tensor.from_hp(w, group_size=GROUP)
    torch.cuda.synchronize()
    quant_s = time.perf_counter() - start
    methods["any4"] = ([q] + [q.clone() for _ in range(copies_for(q.storage_bytes()) - 1)], F.linear)
    methods["bf16 cuBLAS"] = ([w] + [w.clone() for _ in range(copies_for(tensor_bytes(w)) - 1)], F.linear)

    def naive(x, qw):  # the same format through plain torch ops: gather, scale, then cuBLAS
        codes = qw.codes().long()
        vals = torch.gather(qw.lut, 1, codes)
        s = qw.scale.repeat_interleave(GROUP, 1)[:, :k]
        z = qw.zero_point.repeat_interleave(GROUP, 1)[:, :k]
        return F.linear(x, vals * s + z)

    if "naive" in include:
        methods["naive dequant+mm"] = (methods["any4"][0][:2], naive)
    if "torchao" in include:
        try:
            from torchao.quantization import Int4WeightOnlyConfig, quantize_

            lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=dtype)
            lin.weight.data.copy_(w)
            quantize_(lin, Int4WeightOnlyConfig(group_size=GROUP, int4_packing_format="tile_packed_to_4d"))
            tw = lin.weight.detach()
            ws = [tw] + [tw.clone() for _ in range(copies_for(n * k // 2 + n * k // GROUP * 4) - 1)]
            methods["torchao int4"] = (ws, F.linear)
        except Exception as e:  # a missing baseline is reported, not fatal
            print(f"torchao int4 unavailable for {n}x{k}: {e!r}", file=sys.stderr)
    if "gemlite" in include:
        try:
            from gemlite.helper import A16W4_HQQ_INT

            def gem():
                wq = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.uint8)
                sc = torch.rand(n, k // GROUP, device="cuda", dtype=dtype) * 0.01
                zr = torch.full((n, k // GROUP), 8.0, device="cuda", dtype=dtype)
                return A16W4_HQQ_INT(device="cuda", dtype=dtype).from_weights(wq, sc, zr)

            layers = [gem() for _ in range(copies_for(n * k // 2))]
            methods["gemlite int4"] = (layers, lambda x, layer: layer(x))
        except Exception as e:
            print(f"gemlite unavailable for {n}x{k}: {e!r}", file=sys.stderr)
    return methods, q, quant_s


def kmeans_throughput(dtype):
    """Seconds to quantize ~1.07e9 weights with any4 (default settings) on this GPU."""
    rows, k, reps = 8192, 4096, 32  # 32 layers of 8192x4096 = 1.07e9 weights
    w = torch.randn(rows, k, device="cuda", dtype=dtype)
    Any4Tensor.from_hp(w[:256], group_size=GROUP)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        Any4Tensor.from_hp(w, group_size=GROUP)
    torch.cuda.synchronize()
    return rows * k * reps, time.perf_counter() - start


def _sweep_candidates(m, n, k):
    """lut_mma launch configs to try at this M (the data the selector's rule tables are fitted to):
    K warps 1-8, one or two 16-row weight tiles per warp, code words prefetched 1 or 2 steps
    ahead, at M > 8 a lane's words of a step consecutive or 4 apart (spread); M > 16: 2, 4 or 8
    n-tiles per program; small N also split K. The selector's own pick comes first."""
    cands = [selector.mma_config(m, n, k, GROUP, torch.device("cuda"))]
    bms = [8 if m <= 8 else 16] if m <= 16 else [bm for bm in (16, 32, 64) if bm <= triton_pow2(m) <= 4 * bm]
    for bm in bms:
        for k_warps in (1, 2, 4, 8):
            for row_tiles in (1, 2) if bm <= 32 else (1,):
                for prefetch in (1, 2):
                    for spread in (False, True) if m > 8 else (False,):
                        cands.append(selector.MmaConfig(bm, row_tiles, k_warps, prefetch, spread))
    if n <= 2048:  # few row tiles: more programs by splitting K (an fp32 workspace, then a sum)
        for split in (2, 4):
            cands.append(selector.MmaConfig(bms[0], 1, 4, 2, False, split))
    return list(dict.fromkeys(c for c in cands if c is not None))


def sweep_configs(dtype, sweep_ms=SWEEP_MS, dequant=True, shapes=SWEEP_SHAPES):
    """Every candidate kernel config at decode sizes, each checked against float64 (NaN-poisoned
    outputs) before it is timed; then the dequantize kernels (LUT by byte permutes vs load)."""
    from any4ao.kernels import ops  # noqa: F401  (registers torch.ops.any4ao.*)
    from any4ao.kernels.launch import lut_dequantize, lut_mma

    out = []
    for n, k in shapes:
        w = torch.randn(n, k, device="cuda", dtype=dtype) * 0.02
        q = Any4Tensor.from_hp(w, group_size=GROUP, kmeans_iterations=2)
        copies = [q] + [q.clone() for _ in range(copies_for(q.storage_bytes()) - 1)]
        w64 = q.dequantize(torch.float64)
        for m in sweep_ms:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = x.double() @ w64.t()
            results = []
            wb = [w] + [w.clone() for _ in range(copies_for(w.numel() * w.element_size()) - 1)]
            us_bf16 = graph_time_us([lambda w_=w_: F.linear(x, w_) for w_ in wb], replays=10)
            del wb
            out.append({"N": n, "K": k, "M": m, "config": "bf16 cuBLAS", "us": us_bf16})
            op = torch.ops.any4ao.lut_linear  # what the selector does today, for comparison
            us_op = graph_time_us(
                [lambda c=c_: op(x, c.qdata, c.lut, c.scale, c.zero_point, 4, GROUP) for c_ in copies], replays=10
            )
            out.append({"N": n, "K": k, "M": m, "config": "torch.ops.any4ao.lut_linear", "us": us_op})
            for i, cfg in enumerate(_sweep_candidates(m, n, k)):
                try:
                    with Poison():
                        y = lut_mma(x, q.qdata, q.lut, q.scale, q.zero_point, 4, GROUP, cfg)
                    err = ((y.double() - ref).norm() / ref.norm()).item()
                    if not err < 1e-2:
                        print(f"  sweep {n}x{k} M={m} {cfg}: WRONG rel err {err}", flush=True)
                        continue
                    us = graph_time_us(
                        [
                            lambda c=c_: lut_mma(x, c.qdata, c.lut, c.scale, c.zero_point, 4, GROUP, cfg)
                            for c_ in copies
                        ],
                        replays=10,
                    )
                except Exception as e:
                    print(f"  sweep {n}x{k} M={m} {cfg}: {e!r}"[:300], flush=True)
                    continue
                results.append((us, cfg))
                out.append({"N": n, "K": k, "M": m, "config": str(cfg), "selected": i == 0, "us": us, "rel_err": err})
            results.sort(key=lambda r: r[0])
            print(
                f"  sweep {n}x{k} M={m}: bf16 cuBLAS {us_bf16:.1f} us, lut_linear today {us_op:.1f} us; best:",
                flush=True,
            )
            for us, cfg in results[:4]:
                print(f"     {us:7.1f} us  {cfg}", flush=True)
        for bn, bk, warps, permute in (
            []
            if not dequant
            else [
                (16, 128, 4, False),
                (16, 128, 4, True),
                (32, 128, 4, True),
                (64, 128, 4, True),
                (64, 128, 8, True),
                (8, 128, 2, True),
            ]
        ):

            def deq(c, bn=bn, bk=bk, warps=warps, permute=permute):
                return lut_dequantize(c.qdata, c.lut, c.scale, c.zero_point, 4, GROUP, k, dtype, bn, bk, permute, warps)

            with Poison():
                err = (deq(q).double() - w64).abs().max().item()
            us = graph_time_us([lambda c=c_: deq(c) for c_ in copies], replays=10)
            gbs = (q.storage_bytes() + n * k * 2) / us / 1e3
            print(
                f"  dequant {n}x{k} BN={bn} BK={bk} warps={warps} permute={permute}: {us:.1f} us "
                f"({gbs:.0f} GB/s), max err {err:.1e}",
                flush=True,
            )
            out.append(
                {
                    "N": n,
                    "K": k,
                    "dequant": dict(block_n=bn, block_k=bk, num_warps=warps, permute=permute),
                    "us": us,
                    "max_abs_err": err,
                }
            )
        del copies, q, w, w64
        torch.cuda.empty_cache()
    return out


def triton_pow2(m):
    return 1 << (m - 1).bit_length()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--quick", action="store_true", help="two shapes, three Ms")
    p.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="N x K, comma-separated")
    p.add_argument("--ms", default=",".join(map(str, MS)), help="rows of x")
    p.add_argument("--baselines", default="torchao,gemlite,naive")
    p.add_argument("--sweep", action="store_true", help="also time alternative kernel block shapes")
    p.add_argument("--sweep-only", action="store_true")
    p.add_argument("--sweep-ms", default=",".join(map(str, SWEEP_MS)), help="rows of x for the sweep")
    p.add_argument("--no-dequant-sweep", action="store_true")
    p.add_argument("--sweep-shapes", default=",".join(f"{n}x{k}" for n, k in SWEEP_SHAPES), help="N x K for the sweep")
    args = p.parse_args()
    torch.manual_seed(0)
    dtype = torch.bfloat16
    shapes = [tuple(int(v) for v in nk.split("x")) for nk in args.shapes.split(",")]
    ms = [int(m) for m in args.ms.split(",")]
    shapes, ms = (SHAPES[:1] + SHAPES[4:5], [1, 16, 2048]) if args.quick else (shapes, ms)
    include = set(args.baselines.split(","))
    gpu = torch.cuda.get_device_name()
    meta = result_meta(
        group_size=GROUP,
        dtype=str(dtype),
        timing="median of 20 CUDA-graph replays; weights rotated over >3x L2 per replay",
    )
    rows, checks = [], []
    for n, k in [] if args.sweep_only else shapes:
        methods, q, quant_s = make_methods(n, k, dtype, include)
        print(f"\n{n}x{k}: any4 quantized (10 iterations) in {quant_s:.2f}s", flush=True)
        for m in ms:
            err = check_any4(q, m, k, dtype, Poison)
            cfg = selector.mma_config(m, n, k, GROUP, torch.device("cuda"))
            checks.append({"N": n, "K": k, "M": m, "rel_err_vs_fp64": err, "config": str(cfg or "dequantize + mm")})
            ok = err == err and err < 1e-2
            print(
                f"  M={m:5d} check rel err {err:.2e} {'ok' if ok else 'FAIL'}  ({cfg or 'dequantize + mm'})", flush=True
            )
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            for name, (weights, fn) in methods.items():
                try:
                    us = graph_time_us([lambda w=w_: fn(x, w) for w_ in weights])
                except SkipMethod:
                    continue
                except Exception as e:
                    print(f"    {name}: failed {e!r}", flush=True)
                    traceback.print_exc()
                    continue
                rows.append(
                    {
                        "N": n,
                        "K": k,
                        "M": m,
                        "method": name,
                        "us": us,
                        **{k_: meta[k_] for k_ in ("device", "torch", "triton")},
                    }
                )
                print(f"    {name:18s} {us:10.1f} us", flush=True)
        del methods, q
        torch.cuda.empty_cache()
    result = {"meta": meta, "rows": rows, "checks": checks}
    if args.sweep or args.sweep_only:
        sweep_shapes = [tuple(int(v) for v in nk.split("x")) for nk in args.sweep_shapes.split(",")]
        result["sweep"] = sweep_configs(
            dtype, [int(m) for m in args.sweep_ms.split(",")], not args.no_dequant_sweep, sweep_shapes
        )
    if args.sweep_only:  # keep the full benchmark's files; the sweep goes to a file of its own
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        tag = gpu.replace(" ", "-").replace("/", "-")
        (out_dir / f"sweep-{tag}.json").write_text(json.dumps({"meta": meta, "sweep": result["sweep"]}, indent=1))
        return
    if not args.quick and not args.sweep_only:
        numel, seconds = kmeans_throughput(dtype)
        result["kmeans"] = {
            "weights": numel,
            "seconds": seconds,
            "iterations": "defaults of Any4WeightOnlyConfig",
            "group_size": GROUP,
        }
        print(f"\nk-means any4: {numel / 1e9:.2f}e9 weights in {seconds:.1f}s", flush=True)
    write_outputs(result, Path(args.out), gpu)


def write_outputs(result, out_dir, gpu):
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = gpu.replace(" ", "-").replace("/", "-")
    (out_dir / f"kernels-{tag}.json").write_text(json.dumps(result, indent=1))
    rows = result["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    table = {(r["N"], r["K"], r["M"], r["method"]): r["us"] for r in rows}
    lines = [
        f"# Kernel benchmark on {gpu}",
        "",
        "```",
        json.dumps(result["meta"], indent=1),
        "```",
        "",
        "Time per call in us (median); in brackets: speedup vs bf16 cuBLAS.",
        "",
        "| N x K | M | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for n, k in dict.fromkeys((r["N"], r["K"]) for r in rows):
        for m in dict.fromkeys(r["M"] for r in rows):
            base = table.get((n, k, m, "bf16 cuBLAS"))
            cells = []
            for meth in methods:
                us = table.get((n, k, m, meth))
                cells.append("-" if us is None else f"{us:.1f} ({base / us:.2f}x)" if base else f"{us:.1f}")
            lines.append(f"| {n}x{k} | {m} | " + " | ".join(cells) + " |")
    if "kmeans" in result:
        km = result["kmeans"]
        lines += [
            "",
            f"any4 k-means ({km['iterations']} iterations, group {km['group_size']}): "
            f"{km['weights'] / 1e9:.2f}e9 weights in {km['seconds']:.1f} s",
        ]
    (out_dir / f"kernels-{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        shapes = list(dict.fromkeys((r["N"], r["K"]) for r in rows))
        fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.5), sharey=True, squeeze=False)
        for ax, (n, k) in zip(axes[0], shapes):
            ms = sorted({r["M"] for r in rows if (r["N"], r["K"]) == (n, k)})
            for meth in methods:
                pts = [
                    (m, table[(n, k, m, "bf16 cuBLAS")] / table[(n, k, m, meth)])
                    for m in ms
                    if (n, k, m, meth) in table and (n, k, m, "bf16 cuBLAS") in table
                ]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=meth)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_title(f"{n}x{k}")
            ax.set_xlabel("M")
        axes[0][0].set_ylabel("speedup vs bf16 cuBLAS")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / f"kernels-{tag}.png", dpi=110)
    except Exception as e:
        print(f"plot skipped: {e!r}")


if __name__ == "__main__":
    main()
