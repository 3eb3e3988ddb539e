"""`torch.library` custom ops over the Triton kernels, so torch.compile(fullgraph=True) traces
through them (triton_op exposes the kernels to Inductor) and CUDA graphs capture them."""

import torch
from torch.library import triton_op

from any4ao.kernels.launch import lut_dequantize, lut_matmul

# From this many rows of x on, dequantizing W once (one pass, ~1.4 TB/s on an H100) and calling
# cuBLAS beat the fused GEMM in the H100 sweeps (benchmarks/results): at M=64 on 4096x4096 the
# fused kernel took 92 us against ~29 us dequantize + ~16 us cuBLAS.
DEQUANT_THEN_MM_MIN_M = 17


@triton_op("any4ao::lut_linear", mutates_args=())
def lut_linear(
    x: torch.Tensor, qdata: torch.Tensor, lut: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    nbits: int, group_size: int,
) -> torch.Tensor:
    """x (M, K) @ W^T -> (M, N) in x's dtype."""
    if x.shape[0] >= DEQUANT_THEN_MM_MIN_M:
        w = lut_dequantize(qdata, lut, scales, zeros, nbits, group_size, x.shape[1], x.dtype)
        return torch.mm(x, w.t())
    return lut_matmul(x, qdata, lut, scales, zeros, nbits, group_size)


@triton_op("any4ao::dequantize", mutates_args=())
def dequantize(
    qdata: torch.Tensor, lut: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    nbits: int, group_size: int, in_features: int, dtype: torch.dtype,
) -> torch.Tensor:
    return lut_dequantize(qdata, lut, scales, zeros, nbits, group_size, in_features, dtype)
