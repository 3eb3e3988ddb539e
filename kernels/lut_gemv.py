"""GEMV / skinny GEMM for decode (M <= 4): no tensor cores, a multiply-reduce on CUDA cores.

At decode the weight stream is all that matters: each program dequantizes one (BLOCK_N, BLOCK_K)
tile per step and applies it to all M rows of x, so every packed byte is read exactly once.
Grid: (N tiles, SPLIT_K); partial sums go to an fp32 workspace (deterministic, as in lut_gemm).
"""

import triton
import triton.language as tl

from any4ao.kernels.lut_tile import dequant_tile


@triton.jit
def lut_gemv_kernel(
    x_ptr, q_ptr, lut_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_qn, stride_sn, stride_os, stride_om,
    NBITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, LUT_SELECT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_blocks = tl.cdiv(K, BLOCK_K)
    blocks_per_split = tl.cdiv(k_blocks, SPLIT_K)
    k_begin = pid_k * blocks_per_split * BLOCK_K
    k_end = tl.minimum(k_begin + blocks_per_split * BLOCK_K, K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = dequant_tile(q_ptr, lut_ptr, s_ptr, z_ptr, offs_n, k0, N, K, stride_qn, stride_sn, NBITS, GROUP, BLOCK_K, LUT_SELECT)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0,
        ).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)

    out = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
