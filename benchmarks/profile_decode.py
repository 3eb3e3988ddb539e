"""Profile the any4 decode matmul with Nsight Compute, to see what bounds it.

    ncu --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \\
        -k regex:lut --launch-skip 3 --launch-count 1 python3 benchmarks/profile_decode.py [N K [M [RW,KW,STAGES,BLOCK_K[,BLOCK_M,SCALED_A[,ROW_TILES[,PREFETCH]]]]]]
Runs the decode matmul for x (M, K) bf16 against an N x K any4 weight (group 128) a few times: the
dispatcher's choice, or lut_mma with RW row warps x KW K warps STAGES pipeline stages,
BLOCK_K columns per step, BLOCK_M rows of x per program, SCALED_A (0 / 1), ROW_TILES 16-row
weight tiles per warp and PREFETCH (0: code loads through shared memory; 1, 2: registers, steps ahead).
"""

import sys

import torch

from any4ao import Any4Tensor
from any4ao.kernels.launch import KernelConfig, lut_matmul

n, k = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (4096, 4096)
m = int(sys.argv[3]) if len(sys.argv) > 3 else 1
config = None
if len(sys.argv) > 4:
    rw, kw, stages, bk, *rest = (int(v) for v in sys.argv[4].split(","))
    bm = rest[0] if rest else (8 if m <= 8 else 16)
    rt = rest[2] if len(rest) > 2 else 1
    config = KernelConfig(
        "decode-mma",
        bm,
        16 * rw * rt,
        bk,
        1,
        rw * kw,
        stages,
        k_warps=kw,
        scaled_a=bool(rest[1]) if len(rest) > 1 else False,
        row_tiles=rt,
        prefetch=rest[3] if len(rest) > 3 else 0,
    )
w = Any4Tensor.from_hp(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), group_size=128, iterations=2)
x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
for _ in range(6):
    y = lut_matmul(x, w.qdata, w.lut, w.scale, w.zero_point, 4, 128, config)
torch.cuda.synchronize()
print("ok", tuple(y.shape))
