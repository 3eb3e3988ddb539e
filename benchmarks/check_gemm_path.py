"""Prefill-sized F.linear on an Any4Tensor through the selector: which path it takes (lut_gemm or
dequantize + mm), its error against float64 (NaN-poisoned outputs) and its time next to the
dequantize + mm path and bf16 cuBLAS, measured in one run (CUDA graphs, weights rotated past L2).

    python benchmarks/check_gemm_path.py [--out DIR] [--ms 65,128]
"""

import argparse

import torch
import torch.nn.functional as F
from bench_kernels import GROUP, Poison, reference_times, rel_err, result_meta, rotated_any4, write_rows

from any4ao.kernels import ops, selector  # noqa: F401  (ops registers torch.ops.any4ao.*)

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 4096)]
MS = [65, 128, 256, 512]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--ms", default=",".join(map(str, MS)), help="token counts M")
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    print("| N x K | M | path | rel err vs fp64 | F.linear us | dequantize + mm us | bf16 cuBLAS us |")
    print("|---|---|---|---|---|---|---|")
    for n, k in SHAPES:
        w, q, wb, copies, w64 = rotated_any4(n, k)
        for m in [int(v) for v in args.ms.split(",")]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cfg = selector.choose(x, q.qdata, q.lut, q.scale, q.zero_point, 4, GROUP)
            with Poison():
                y = F.linear(x, q)
            ref = x.double() @ w64.t()
            err = rel_err(y, ref)
            op, dq, bf = reference_times(x, copies, wb)
            path = "lut_gemm" if isinstance(cfg, selector.GemmConfig) else "dequantize + mm"
            rows.append(
                dict(N=n, K=k, M=m, path=path, config=str(cfg), rel_err=err, us=op, dequant_mm_us=dq, bf16_us=bf)
            )
            print(f"| {n}x{k} | {m} | {path} | {err:.1e} | {op:.1f} | {dq:.1f} | {bf:.1f} |", flush=True)
    meta = result_meta(
        timing="median of 20 CUDA-graph replays; weights rotated over >3x L2 per replay",
    )
    write_rows(args.out, "gemm-path", meta, rows)


if __name__ == "__main__":
    main()
