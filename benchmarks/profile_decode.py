"""Profile the any4 decode matmul with Nsight Compute, to see what bounds it.

    ncu --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \\
        -k regex:lut --launch-skip 3 --launch-count 1 python3 benchmarks/profile_decode.py [N K [M [BM,RT,KW,PF[,SPREAD]]]]
Runs the decode matmul for x (M, K) bf16 against an N x K any4 weight (group 128) a few times: the
selector's choice, or lut_mma with BM rows of x per program, RT 16-row weight tiles per warp, KW K
warps, code words prefetched PF (1, 2) steps ahead and SPREAD (0 / 1).
"""

import sys

import torch

from any4ao import Any4Tensor
from any4ao.kernels.launch import lut_mma
from any4ao.kernels.selector import MmaConfig, mma_config

n, k = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (4096, 4096)
m = int(sys.argv[3]) if len(sys.argv) > 3 else 1
if len(sys.argv) > 4:
    bm, rt, kw, pf, *rest = (int(v) for v in sys.argv[4].split(","))
    config = MmaConfig(bm, rt, kw, pf, bool(rest[0]) if rest else False)
else:
    config = mma_config(m, n, k, 128, torch.device("cuda"))
w = Any4Tensor.from_hp(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), group_size=128, kmeans_iterations=2)
x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
for _ in range(6):
    y = lut_mma(x, w.qdata, w.lut, w.scale, w.zero_point, 4, 128, config)
torch.cuda.synchronize()
print("ok", tuple(y.shape), config)
