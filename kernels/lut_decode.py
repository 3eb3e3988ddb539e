"""Decode matmul (small M) out = x @ W^T with the LUT looked up in registers (lut_permute).

Since lut_mma (the same lookup feeding mma.sync directly) this is the fallback for M <= 16 where
lut_mma does not apply (x in another dtype than the LUT, groups not a multiple of 32, unaligned x).

Each program owns BLOCK_N rows of W, one K split and BLOCK_M rows of x (grid: N tiles, SPLIT_K,
M tiles). It builds its rows' LUT byte planes once, then per K block reads one
(BLOCK_N, BLOCK_K / 8) tile of 32-bit code words and looks the codes up, two ways:
  USE_DOT  tensor cores, W as the left operand: out^T = W x^T, so the looked-up values feed the
           MMA from registers and x (BLOCK_M >= 16 rows, a few of them real) is the small operand.
           One dot per byte phase (columns 8w + p) with the matching strided columns of x: no
           interleaving of the 8 phases, whose layout conversion went through shared memory.
  FMA      BLOCK_M == 1 (M = 1): on CUDA cores, each word's 8 phases meet the matching 8 values of
           a contiguous x block in one FMA chain, into per-thread partial sums (scale and zero
           applied per partial); rows are reduced across threads only once, at the end. BLOCK_K
           need not divide the group.
With SPLIT_K > 1 the partial sums go to an fp32 workspace (SPLIT_K, M, N) that the host sums
(deterministic, no atomics). Needs 16-bit LUTs, nibble-packed codes (3 or 4 bits) and K % 8 == 0;
the launcher sends everything else to lut_gemm.
"""

import triton
import triton.language as tl

from any4ao.kernels.lut_permute import load_words, lookup_phases, lut_byte_planes
from any4ao.kernels.lut_tile import group_scale_zero, load_x_phase, split_k_range


@triton.jit
def _phase_dot(v, x_ptr, offs_m, k0, offs_w, p: tl.constexpr, M, K, stride_xm, acc, DOT_FP32: tl.constexpr):
    """acc (BLOCK_N, BLOCK_M) + v (BLOCK_N, W) @ x[:, k0 + 8w + p]^T."""
    x = load_x_phase(x_ptr, offs_m, k0, offs_w, p, M, K, stride_xm, 8)
    if DOT_FP32:
        # Interpreter only: its bf16 tl.dot is wrong (triton 3.9), fp32 is exact.
        return tl.dot(v.to(tl.float32), tl.trans(x.to(tl.float32)), acc, input_precision="ieee")
    else:
        return tl.dot(v.to(x.dtype), tl.trans(x), acc)  # LUT entries are exact in x's dtype


@triton.jit
def _phases_of(x):
    """(W, 8) -> the 8 columns as (W,) tensors (register-only: a thread holds a word's 8 values)."""
    # column 8w + 4a + 2b + c; tl.split takes the last axis: c, then b, then a
    a0, a1 = tl.split(tl.reshape(x, (x.shape[0], 2, 2, 2)))
    b0, b1 = tl.split(a0)
    b2, b3 = tl.split(a1)
    x0, x4 = tl.split(b0)
    x2, x6 = tl.split(b1)
    x1, x5 = tl.split(b2)
    x3, x7 = tl.split(b3)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def lut_decode_kernel(
    x_ptr, qw_ptr, lut_words_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_qw, stride_sn, stride_os, stride_om,
    LUT_SIZE: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    LUT_FP16: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, USE_ASM: tl.constexpr,
    CHUNK: tl.constexpr, STAGES: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    L0, L1, L2, L3, H0, H1, H2, H3 = lut_byte_planes(lut_words_ptr, offs_n, N, LUT_SIZE, USE_ASM)
    k_begin, k_end = split_k_range(pid_k, K, BLOCK_K, SPLIT_K)
    out = out_ptr + pid_k * stride_os + offs_m[None, :] * stride_om + offs_n[:, None]
    out_mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)

    if USE_DOT:
        offs_w = tl.arange(0, BLOCK_K // 8)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            words = load_words(qw_ptr, offs_n, k0, N, K, stride_qw, BLOCK_K)
            v0, v1, v2, v3, v4, v5, v6, v7 = lookup_phases(words, L0, L1, L2, L3, H0, H1, H2, H3, LUT_FP16, USE_ASM)
            # Chained through the accumulator, so the 8 MMAs can be issued back to back.
            block = _phase_dot(v0, x_ptr, offs_m, k0, offs_w, 0, M, K, stride_xm, tl.zeros_like(acc), DOT_FP32)
            block = _phase_dot(v1, x_ptr, offs_m, k0, offs_w, 1, M, K, stride_xm, block, DOT_FP32)
            block = _phase_dot(v2, x_ptr, offs_m, k0, offs_w, 2, M, K, stride_xm, block, DOT_FP32)
            block = _phase_dot(v3, x_ptr, offs_m, k0, offs_w, 3, M, K, stride_xm, block, DOT_FP32)
            block = _phase_dot(v4, x_ptr, offs_m, k0, offs_w, 4, M, K, stride_xm, block, DOT_FP32)
            block = _phase_dot(v5, x_ptr, offs_m, k0, offs_w, 5, M, K, stride_xm, block, DOT_FP32)
            block = _phase_dot(v6, x_ptr, offs_m, k0, offs_w, 6, M, K, stride_xm, block, DOT_FP32)
            block = _phase_dot(v7, x_ptr, offs_m, k0, offs_w, 7, M, K, stride_xm, block, DOT_FP32)
            cols = k0 + offs_k
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :],
                        mask=(offs_m[:, None] < M) & (cols[None, :] < K), other=0.0)
            x_sum = tl.sum(x.to(tl.float32), axis=1)
            scale, zero = group_scale_zero(s_ptr, z_ptr, offs_n, k0, N, stride_sn, GROUP)
            acc += block * scale[:, None] + zero[:, None] * x_sum[None, :]
        tl.store(out, acc, mask=out_mask)
    else:
        tl.static_assert(BLOCK_M == 1, "the FMA path serves one row of x per program")
        # Per word, the 8 phases meet the 8 matching x values in one FMA chain; then each thread
        # sums its own CHUNK columns of a row (CHUNK divides the group: one scale and zero per
        # partial sum). The partial sums of a row meet across threads once, after the loop.
        # BLOCK_K may span several groups: bigger loads per step keep more bytes in flight.
        W: tl.constexpr = BLOCK_K // 8
        CHUNKS: tl.constexpr = BLOCK_K // CHUNK
        offs_k = tl.arange(0, BLOCK_K)
        offs_c = tl.arange(0, CHUNKS) * CHUNK
        row_ok = offs_m < M
        nmask = offs_n < N
        acc = tl.zeros((BLOCK_N, CHUNKS), dtype=tl.float32)
        for k0 in tl.range(k_begin, k_end, BLOCK_K, num_stages=STAGES):
            words = load_words(qw_ptr, offs_n, k0, N, K, stride_qw, BLOCK_K)
            v0, v1, v2, v3, v4, v5, v6, v7 = lookup_phases(words, L0, L1, L2, L3, H0, H1, H2, H3, LUT_FP16, USE_ASM, True)
            cols = k0 + offs_k
            x = tl.load(x_ptr + offs_m * stride_xm + cols, mask=row_ok & (cols < K), other=0.0).to(tl.float32)
            x0, x1, x2, x3, x4, x5, x6, x7 = _phases_of(tl.reshape(x, (W, 8)))
            dot = v0 * x0[None, :] + v1 * x1[None, :] + v2 * x2[None, :] + v3 * x3[None, :]
            dot += v4 * x4[None, :] + v5 * x5[None, :] + v6 * x6[None, :] + v7 * x7[None, :]
            part = tl.sum(tl.reshape(dot, (BLOCK_N, CHUNKS, CHUNK // 8)), axis=2)
            x_part = tl.sum(tl.reshape(tl.sum(tl.reshape(x, (W, 8)), axis=1), (CHUNKS, CHUNK // 8)), axis=1)
            params = offs_n[:, None] * stride_sn + ((k0 + offs_c) // GROUP)[None, :]
            pmask = nmask[:, None] & ((k0 + offs_c) < K)[None, :]
            scale = tl.load(s_ptr + params, mask=pmask, other=0.0).to(tl.float32)
            zero = tl.load(z_ptr + params, mask=pmask, other=0.0).to(tl.float32)
            acc += part * scale + zero * x_part[None, :]
        tl.store(out, tl.sum(acc, axis=1)[:, None], mask=out_mask)
