"""Standalone dequantization to a dense (N, K) matrix: for Any4Tensor.dequantize() on GPU and for
the large-M path (dequantize once, then cuBLAS)."""

import triton
import triton.language as tl

from any4ao.kernels.lut_tile import group_scale_zero, load_packed, lut_lookup, phase_codes


@triton.jit
def dequant_kernel(
    q_ptr, lut_ptr, s_ptr, z_ptr, out_ptr,
    N, K,
    stride_qn, stride_sn, stride_on,
    NBITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, LUT_SELECT: tl.constexpr,
):
    PER_BYTE: tl.constexpr = 4 if NBITS == 2 else 2
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_j = tl.arange(0, BLOCK_K // PER_BYTE)
    packed = load_packed(q_ptr, offs_n, k0, N, K, stride_qn, BLOCK_K, PER_BYTE)
    scale, zero = group_scale_zero(s_ptr, z_ptr, offs_n, k0, N, stride_sn, GROUP)
    for p in tl.static_range(PER_BYTE):
        cols = k0 + offs_j * PER_BYTE + p
        v = lut_lookup(lut_ptr, offs_n, phase_codes(packed, p, NBITS), N, 1 << NBITS, LUT_SELECT)
        w = v * scale[:, None] + zero[:, None]
        mask = (offs_n[:, None] < N) & (cols[None, :] < K)
        tl.store(out_ptr + offs_n[:, None] * stride_on + cols[None, :], w, mask=mask)
