"""Standalone dequantization to a dense (N, K) matrix: for Any4Tensor.dequantize() on GPU and for
the large-M path (dequantize once, then cuBLAS)."""

import triton
import triton.language as tl

from any4ao.kernels.lut_tile import dequant_tile


@triton.jit
def dequant_kernel(
    q_ptr, lut_ptr, s_ptr, z_ptr, out_ptr,
    N, K,
    stride_qn, stride_sn, stride_on,
    NBITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, LUT_SELECT: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    w = dequant_tile(q_ptr, lut_ptr, s_ptr, z_ptr, offs_n, k0, N, K, stride_qn, stride_sn, NBITS, GROUP, BLOCK_K, LUT_SELECT)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_k[None, :], w, mask=mask)
