"""lut_gemm (the fused tensor-core LUT GEMM) launch configs against bf16 cuBLAS, the dequantize + mm
path and torchao int4, at prefill sizes; the data selector.gemm_config is fitted to.

    python benchmarks/sweep_gemm.py [--out DIR] [--shapes 4096x4096,...] [--ms 128,512,...]
        [--tiles winners|all|128x128x64x16x3,...] [--prefetch on] [--pair-dot on]

Every candidate config runs on each real shape against float64 before it is timed (outputs
NaN-poisoned; a wrong config is dropped and reported); at the end the winners also run on ragged
problems (M, N not tile multiples, 3- and 4-bit, fp16 and bf16). Then timing as in bench_kernels.py: CUDA-graph replays over weight copies that walk
through more than 3x the L2 cache, median per call. Writes sweep-gemm-<gpu>.json and .md.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_kernels import GROUP, Poison, copies_for, graph_time_us, result_meta

from any4ao import Any4Tensor
from any4ao.kernels import (
    ops,  # noqa: F401  (registers torch.ops.any4ao.*)
    selector,
)
from any4ao.kernels.launch import dequantize_then_mm, lut_gemm
from any4ao.kernels.selector import GemmConfig

SHAPES = [(4096, 4096), (28672, 4096), (4096, 14336), (14336, 4096)]
MS = [128, 512, 2048]
# (block_m, block_n, block_k, num_warps, num_stages); each tried with both operand orders
TILES = [
    (64, 64, 64, 4, 4),
    (64, 128, 64, 4, 3),
    (128, 64, 64, 4, 4),
    (128, 128, 64, 4, 3),
    (128, 128, 64, 8, 3),
    (128, 128, 128, 8, 3),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (256, 64, 64, 8, 3),
    (128, 128, 32, 8, 4),  # 32-column steps: fewer registers per W tile, maybe two CTAs per SM
    (256, 128, 32, 8, 4),
]
# the tiles that won somewhere in the first H200 sweep (sweep-gemm-NVIDIA-H200*.md): --tiles winners
WINNERS = [(128, 64, 64, 4, 4), (128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (256, 64, 64, 8, 3), (256, 128, 64, 8, 3)]


def parse_tiles(spec):
    """'all', 'winners' or a comma list of block_m x block_n x block_k x num_warps x num_stages."""
    if spec in ("all", "winners"):
        return TILES if spec == "all" else WINNERS
    return [tuple(int(v) for v in t.split("x")) for t in spec.split(",")]


def candidates(m, n, k, sms, tiles=TILES, prefetch=(False,), pair_dot=(False,)):
    """Every tile shape x operand order x prefetch (code words a step ahead or not) x pair_dot (where
    it applies: swap_ab, block_k >= 64; "on" alone keeps only such configs), split K to fill the GPU
    where the tiles do not; plus the selector's own pick first."""
    out = [selector.gemm_config(m, n, k, GROUP, torch.device("cuda"))]
    for bm, bn, bk, warps, stages in tiles:
        if bm > 2 * max(m, 64):
            continue
        tiles = -(-m // bm) * -(-n // bn)
        for swap in (False, True):
            for split in (1, 2, 4):
                if split > 1 and (tiles * split > 2 * sms or k // (bk * split) < 4):
                    continue
                for pf in prefetch:
                    for pair in [p for p in pair_dot if not p or (swap and bk >= 64)]:
                        out.append(GemmConfig(bm, bn, bk, split, 8, swap, warps, stages, pf, pair_dot=pair))
    return list(dict.fromkeys(c for c in out if c is not None))


def rel_err(out, ref):
    if torch.isnan(out).any():
        return float("nan")
    return ((out.double() - ref).norm() / ref.norm()).item()


def check_ragged(configs):
    """Each config on small ragged problems: 3/4-bit, fp16/bf16, M and N not tile multiples."""
    bad = set()
    for nbits, dtype, (m, n, k) in [(4, torch.bfloat16, (333, 200, 512)), (3, torch.float16, (97, 72, 256))]:
        w = torch.randn(n, k, device="cuda", dtype=dtype)
        q = Any4Tensor.from_hp(w, codebook=f"any{nbits}", group_size=GROUP, kmeans_iterations=2)
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = x.double() @ q.dequantize(torch.float64).t()
        for cfg in configs:
            with Poison():
                err = rel_err(lut_gemm(x, q.qdata, q.lut, q.scale, q.zero_point, nbits, GROUP, cfg), ref)
            if not err < 1e-2:
                print(f"  WRONG on ragged {m}x{n}x{k} {nbits}-bit {dtype}: {cfg} rel err {err}", flush=True)
                bad.add(cfg)
    return bad


def torchao_int4(w, copies):
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
    except ImportError as e:
        print(f"torchao unavailable: {e!r}", file=sys.stderr)
        return None
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="cuda", dtype=w.dtype)
    lin.weight.data.copy_(w)
    quantize_(lin, Int4WeightOnlyConfig(group_size=GROUP, int4_packing_format="tile_packed_to_4d"))
    tw = lin.weight.detach()
    return [tw] + [tw.clone() for _ in range(copies - 1)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    p.add_argument("--ms", default=",".join(map(str, MS)))
    p.add_argument("--replays", type=int, default=10)
    p.add_argument("--tag", default="")
    p.add_argument("--tiles", default="all", help="all, winners, or e.g. 256x64x64x8x3,128x128x128x8x3")
    p.add_argument(
        "--prefetch", default="both", choices=["both", "on", "off"], help="configs with code words loaded a step ahead"
    )
    p.add_argument(
        "--pair-dot",
        default="both",
        choices=["both", "on", "off"],
        help="configs with the looked-up pairs as dot operands",
    )
    args = p.parse_args()
    torch.manual_seed(0)
    dtype = torch.bfloat16
    shapes = [tuple(int(v) for v in nk.split("x")) for nk in args.shapes.split(",")]
    ms = [int(m) for m in args.ms.split(",")]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    meta = result_meta(
        group_size=GROUP,
        dtype=str(dtype),
        timing=f"median of {args.replays} CUDA-graph replays; weights rotated over >3x L2 per replay",
    )
    rows, best, top3 = [], [], []
    for n, k in shapes:
        w = torch.randn(n, k, device="cuda", dtype=dtype) * 0.02
        q = Any4Tensor.from_hp(w, group_size=GROUP, kmeans_iterations=2)
        copies = [q] + [q.clone() for _ in range(copies_for(q.storage_bytes()) - 1)]
        wb = [w] + [w.clone() for _ in range(copies_for(w.numel() * 2) - 1)]
        ao = torchao_int4(w, copies_for(n * k // 2 + n * k // GROUP * 4))
        w64 = q.dequantize(torch.float64)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = x.double() @ w64.t()

            def record(name, us, **extra):
                rows.append({"N": n, "K": k, "M": m, "config": name, "us": us, **extra})

            base = graph_time_us([lambda w_=w_: F.linear(x, w_) for w_ in wb], args.replays)
            record("bf16 cuBLAS", base)
            deq = graph_time_us(
                [lambda c=c: dequantize_then_mm(x, c.qdata, c.lut, c.scale, c.zero_point, 4, GROUP) for c in copies],
                args.replays,
            )
            record("dequantize + mm", deq)
            # what F.linear on the Any4Tensor runs now (lut_mma up to M = 64, else the selector's pick)
            op = graph_time_us([lambda c=c: F.linear(x, c) for c in copies], args.replays)
            record("any4 F.linear", op)
            ao_us = None if ao is None else graph_time_us([lambda t=t: F.linear(x, t) for t in ao], args.replays)
            if ao_us is not None:
                record("torchao int4", ao_us)
            timed = []
            tiles = parse_tiles(args.tiles)
            choice = {"both": (False, True), "on": (True,), "off": (False,)}
            pair_dot = choice[args.pair_dot]
            for i, cfg in enumerate(candidates(m, n, k, sms, tiles, choice[args.prefetch], pair_dot)):
                try:
                    with Poison():
                        err = rel_err(lut_gemm(x, q.qdata, q.lut, q.scale, q.zero_point, 4, GROUP, cfg), ref)
                    if not err < 1e-2:
                        print(f"  {n}x{k} M={m} {cfg}: WRONG rel err {err}", flush=True)
                        continue
                    us = graph_time_us(
                        [lambda c=c: lut_gemm(x, c.qdata, c.lut, c.scale, c.zero_point, 4, GROUP, cfg) for c in copies],
                        args.replays,
                    )
                except Exception as e:  # e.g. out of shared memory or registers: reported, not fatal
                    print(f"  {n}x{k} M={m} {cfg}: {e!r}"[:300], flush=True)
                    continue
                timed.append((us, cfg))
                record(str(cfg), us, selected=i == 0, rel_err=err, gemm=cfg.__dict__)
            timed.sort(key=lambda t: t[0])
            top = timed[0] if timed else (float("nan"), None)
            best.append(
                {"N": n, "K": k, "M": m, "bf16": base, "dequant_mm": deq, "any4_op": op, "torchao_int4": ao_us}
                | {"best_us": top[0], "best": str(top[1])}
            )
            print(
                f"{n}x{k} M={m}: bf16 {base:.1f} us, dequant+mm {deq:.1f}, any4 F.linear {op:.1f}, "
                + (f"torchao int4 {ao_us:.1f}, " if ao_us is not None else "")
                + f"lut_gemm best {top[0]:.1f} ({base / top[0]:.2f}x bf16)",
                flush=True,
            )
            for us, cfg in timed[:3]:
                print(f"     {us:7.1f} us  {cfg}", flush=True)
            top3 += [cfg for _, cfg in timed[:3]]
        del copies, wb, ao, q, w, w64
        torch.cuda.empty_cache()
        write(args, meta, rows, best, quiet=True)  # after every shape: a run cut short keeps what it measured
    winners = list(dict.fromkeys(c for c in top3 if c is not None))
    start = time.perf_counter()
    bad = check_ragged(winners)
    print(f"ragged checks of the {len(winners)} top configs: {len(bad)} wrong ({time.perf_counter() - start:.0f} s)")
    write(args, meta, rows, best, [str(c) for c in bad])


def write(args, meta, rows, best, wrong_on_ragged=None, quiet=False):
    gpu = meta["device"]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = gpu.replace(" ", "-").replace("/", "-") + (f"-{args.tag}" if args.tag else "")
    (out_dir / f"sweep-gemm-{tag}.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "best": best, "wrong_on_ragged": wrong_on_ragged}, indent=1)
    )
    lines = [
        f"# lut_gemm sweep on {gpu}",
        "",
        "```",
        json.dumps(meta, indent=1),
        "```",
        "",
        "| N x K | M | bf16 cuBLAS us | torchao int4 us | dequantize + mm us | any4 F.linear us | best lut_gemm us "
        "| vs bf16 | config |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for b in best:
        lines.append(
            f"| {b['N']}x{b['K']} | {b['M']} | {b['bf16']:.1f} | {b['torchao_int4'] or float('nan'):.1f} | {b['dequant_mm']:.1f} | {b['any4_op']:.1f} | "
            f"{b['best_us']:.1f} | "
            f"{b['bf16'] / b['best_us']:.2f}x | {b['best']} |"
        )
    (out_dir / f"sweep-gemm-{tag}.md").write_text("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
