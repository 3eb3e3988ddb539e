"""The warp-specialised Gluon LUT GEMM (kernels/lut_gemm_ws.py) on a Hopper GPU: first a small smoke
launch of each config under a watchdog (a hang ends the run in --hang-s seconds, naming the config,
instead of using up the device call; a config that raises is dropped, with its error), then its error
against float64 (NaN-poisoned outputs; ragged M and N, fp16) for every config, then its time next to
F.linear on the Any4Tensor (the selector's path today), dequantize + mm and bf16 cuBLAS, in one run
(CUDA graphs, weights rotated past L2, medians of 20 replays).

    python benchmarks/check_ws_gemm.py [--out DIR] [--ms 128,256,512,2048] [--configs 128x128x4,128x128x4x2,128x128x4x1x8,...]
"""

import argparse
import os
import threading
import traceback

import torch
import torch.nn.functional as F
from bench_kernels import GROUP, Poison, graph_time_us, reference_times, rel_err, result_meta, rotated_any4, write_rows

from any4ao import Any4Tensor
from any4ao.kernels import ops  # noqa: F401  (ops registers torch.ops.any4ao.*)
from any4ao.kernels.launch import lut_gemm_ws
from any4ao.kernels.selector import WsConfig

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 4096)]
MS = [128, 256, 512, 2048]
# block_m x block_n x stages [x split_k [x lookup warps]]
CONFIGS = "64x64x6,128x64x4,128x128x4,128x128x5,256x64x4,128x128x4x2,128x128x4x4,128x64x4x2"


def parse_configs(spec):
    return [tuple(int(v) for v in c.split("x")) for c in spec.split(",")]


def run(x, q, cfg):
    """cfg: (block_m, block_n, stages[, split_k[, lookup_warps]]), as WsConfig takes them."""
    return lut_gemm_ws(x, q.qdata, q.lut, q.scale, q.zero_point, GROUP, **vars(WsConfig(*cfg)))


def smoke(configs, hang_s: float):
    """The configs that ran a small ragged problem (M 100, N 200, two K steps per group) within
    hang_s seconds and matched float64; a hang exits the process."""
    w = torch.randn(200, 2 * GROUP, device="cuda", dtype=torch.bfloat16) * 0.02
    q = Any4Tensor.from_hp(w, group_size=GROUP)
    x = torch.randn(100, 2 * GROUP, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ q.dequantize(torch.float64).t()
    ok = []
    for cfg in configs:

        def hang(cfg=cfg):
            print(f"smoke: config {cfg} did not finish in {hang_s} s: a hang; stopping", flush=True)
            os._exit(3)

        timer = threading.Timer(hang_s, hang)
        timer.start()
        try:
            with Poison():
                y = run(x, q, cfg)
                torch.cuda.synchronize()
            err = rel_err(y, ref)
        except Exception:
            print(f"smoke: config {cfg} raised, dropped:\n{traceback.format_exc()}", flush=True)
            continue
        finally:
            timer.cancel()
        print(f"smoke: config {cfg} rel err {err:.1e}", flush=True)
        if err == err and err < 1e-2:  # bf16 (tests/test_kernels.TOLERANCE)
            ok.append(cfg)
    return ok


def check_ragged(configs):
    """Every config on shapes no tile divides (M and N ragged, K = 34 groups, which split 4 divides mid-group), bf16 and fp16."""
    worst = 0.0
    for dtype in (torch.bfloat16, torch.float16):
        n, k = 4160, 4352  # 34 groups, 68 steps: split 4 starts mid-group
        w = torch.randn(n, k, device="cuda", dtype=dtype) * 0.02
        q = Any4Tensor.from_hp(w, group_size=GROUP)
        w64 = q.dequantize(torch.float64)
        for m in (1, 100, 300):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = x.double() @ w64.t()
            for cfg in configs:
                with Poison():
                    err = rel_err(run(x, q, cfg), ref)
                print(f"ragged {dtype} N={n} K={k} M={m} config {cfg}: rel err {err:.1e}", flush=True)
                worst = max(worst, err) if err == err else float("inf")
    return worst


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--ms", default=",".join(map(str, MS)))
    p.add_argument("--configs", default=CONFIGS)
    p.add_argument("--tag", default="")
    p.add_argument("--hang-s", type=float, default=30.0)
    args = p.parse_args()
    torch.manual_seed(0)
    configs = smoke(parse_configs(args.configs), args.hang_s)
    if not configs:
        raise SystemExit("no config passed the smoke test")
    worst_ragged = check_ragged(configs)
    print(f"worst ragged rel err {worst_ragged:.1e}")
    rows = []
    print("| N x K | M | bf16 | F.linear (today) | dequantize + mm | best ws | best ws config | ws rel err (worst) |")
    print("|---|---|---|---|---|---|---|---|")
    for n, k in SHAPES:
        w, q, wb, copies, w64 = rotated_any4(n, k)
        for m in [int(v) for v in args.ms.split(",")]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.double() @ w64.t()
            with Poison():
                today_err = rel_err(F.linear(x, q), ref)
            today, dq, bf = reference_times(x, copies, wb)
            ws = {}
            errs = {}
            for cfg in configs:
                with Poison():
                    errs[cfg] = rel_err(run(x, q, cfg), ref)
                ws[cfg] = graph_time_us([lambda c=c, cfg=cfg: run(x, c, cfg) for c in copies])
            best = min(ws, key=ws.get)
            worst = max(errs.values())
            rows.append(
                dict(
                    N=n,
                    K=k,
                    M=m,
                    bf16_us=bf,
                    flinear_us=today,
                    flinear_rel_err=today_err,
                    dequant_mm_us=dq,
                    ws_us={"x".join(map(str, c)): t for c, t in ws.items()},
                    ws_rel_err={"x".join(map(str, c)): e for c, e in errs.items()},
                )
            )
            print(
                f"| {n}x{k} | {m} | {bf:.1f} | {today:.1f} | {dq:.1f} | {ws[best]:.1f} | {'x'.join(map(str, best))} "
                f"| {worst:.1e} |",
                flush=True,
            )
            print("   ws all: " + ", ".join(f"{'x'.join(map(str, c))} {t:.1f}" for c, t in ws.items()), flush=True)
    meta = result_meta(
        timing="median of 20 CUDA-graph replays; weights rotated over >3x L2 per replay",
        worst_ragged_rel_err=worst_ragged,
        configs="block_m x block_n x stages [x split_k [x lookup warps]]",
    )
    write_rows(args.out, "ws-gemm" + (f"-{args.tag}" if args.tag else ""), meta, rows)


if __name__ == "__main__":
    main()
