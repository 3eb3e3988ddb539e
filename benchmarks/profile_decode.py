"""Profile the any4 decode matmul (M=1) with Nsight Compute, to see what bounds it.

    ncu --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \\
        -k regex:lut --launch-skip 3 --launch-count 1 python3 benchmarks/profile_decode.py [N K]
Runs torch.ops.any4ao.lut_linear for x (1, K) bf16 against an N x K any4 weight (group 128) a few times.
"""

import sys

import torch

from any4ao.kernels import ops  # noqa: F401  (registers torch.ops.any4ao.*)
from any4ao import Any4Tensor

n, k = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (4096, 4096)
w = Any4Tensor.from_hp(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), group_size=128, iterations=2)
x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
for _ in range(6):
    y = torch.ops.any4ao.lut_linear(x, w.qdata, w.lut, w.scales, w.zeros, 4, 128)
torch.cuda.synchronize()
print("ok", tuple(y.shape))
