"""Host time per any4 linear call (GPU, M=1, 4096x4096), back to back, A/B in one process:

    python benchmarks/bench_op_overhead.py

the launcher alone (lut_matmul), torch.ops.any4ao.lut_linear as registered now (torch.library
define/impl), the same body as a @custom_op (how it was registered before), and that with every
launch through wrap_triton (before both changes). Eager and non-CUDA-graph compiled models pay
this once per linear per step; the GPU kernel itself takes about 10 us.
"""
import time, torch
from torch.library import custom_op, wrap_triton
from any4ao import Any4Tensor
from any4ao.kernels import ops, launch
from any4ao.kernels.launch import lut_matmul

@custom_op("ab::lut_linear_custom", mutates_args=())
def f_custom(x: torch.Tensor, qdata: torch.Tensor, lut: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, nbits: int, group_size: int) -> torch.Tensor:
    return lut_matmul(x, qdata, lut, scales, zeros, nbits, group_size)

w = Any4Tensor.from_hp(torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16), group_size=128, iterations=1)
x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
args = (x, w.qdata, w.lut, w.scales, w.zeros, 4, 128)
def host_us(fn, n=2000):
    for _ in range(50): fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    dt = (time.perf_counter() - t) / n * 1e6; torch.cuda.synchronize(); return dt
res = {}
for name, fn in [("lut_matmul direct launch", lambda: lut_matmul(*args)),
                 ("torch.ops define/impl (now)", lambda: torch.ops.any4ao.lut_linear(*args)),
                 ("@custom_op (before)", lambda: torch.ops.ab.lut_linear_custom(*args))]:
    res[name] = min(host_us(fn) for _ in range(3))
launch._launcher = lambda kernel, traceable=False: wrap_triton(kernel)
res["@custom_op + wrap_triton (before both)"] = min(host_us(lambda: torch.ops.ab.lut_linear_custom(*args)) for _ in range(3))
for k, v in res.items(): print(f"{k:40s} {v:7.1f} us per call (back-to-back, M=1 4096x4096; GPU kernel ~10 us)")
