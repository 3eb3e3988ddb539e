"""GEMV / skinny GEMM for decode (M <= 4): multiply-reduce on CUDA cores, no tensor cores.

At decode the weight stream is all that matters: each program reads one packed (BLOCK_N,
BLOCK_K / PER_BYTE) tile per step and applies it to all M rows of x, so every byte is read once;
per weight the work is a shift, a LUT lookup and an FMA (scale and zero are per block, lut_tile).
Grid: (N tiles, SPLIT_K); partial sums go to an fp32 workspace (deterministic, as in lut_gemm).
"""

import triton
import triton.language as tl

from any4ao.kernels.lut_tile import (
    group_scale_zero, load_packed, load_x_phase, lut_lookup, phase_codes, split_k_range,
)


@triton.jit
def lut_gemv_kernel(
    x_ptr, q_ptr, lut_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_qn, stride_sn, stride_os, stride_om,
    NBITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, LUT_MODE: tl.constexpr,
):
    PER_BYTE: tl.constexpr = 4 if NBITS == 2 else 2
    SUB_K: tl.constexpr = BLOCK_K // PER_BYTE
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, SUB_K)
    k_begin, k_end = split_k_range(pid_k, K, BLOCK_K, SPLIT_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        packed = load_packed(q_ptr, offs_n, k0, N, K, stride_qn, BLOCK_K, PER_BYTE)
        block = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        x_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for p in tl.static_range(PER_BYTE):
            x = load_x_phase(x_ptr, offs_m, k0, offs_j, p, M, K, stride_xm, PER_BYTE).to(tl.float32)
            v = lut_lookup(lut_ptr, offs_n, phase_codes(packed, p, NBITS), N, 1 << NBITS, LUT_MODE)
            block += tl.sum(x[:, None, :] * v[None, :, :], axis=2)
            x_sum += tl.sum(x, axis=1)
        scale, zero = group_scale_zero(s_ptr, z_ptr, offs_n, k0, N, stride_sn, GROUP)
        acc += block * scale[None, :] + x_sum[:, None] * zero[None, :]

    out = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
