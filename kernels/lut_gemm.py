"""Tensor-core GEMM  out = x @ W^T  with the LUT lookup inside the main loop.

Per K block: one load of packed codes; per byte phase p, LUT values (BLOCK_N, BLOCK_K/PER_BYTE)
go straight into tl.dot with the matching strided columns of x; scale and zero are applied to the
block's partial product (see lut_tile). Grid: (M tiles x N tiles, SPLIT_K); with SPLIT_K > 1 the
partial sums go to an fp32 workspace (SPLIT_K, M, N) that the host sums: deterministic, no atomics.
"""

import triton
import triton.language as tl

from any4ao.kernels.lut_tile import (
    group_scale_zero, load_packed, load_x_phase, lut_lookup, phase_codes, split_k_range,
)


@triton.jit
def lut_gemm_kernel(
    x_ptr, q_ptr, lut_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_qn, stride_sn, stride_os, stride_om,
    NBITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_FP32: tl.constexpr, LUT_MODE: tl.constexpr,
):
    PER_BYTE: tl.constexpr = 4 if NBITS == 2 else 2
    SUB_K: tl.constexpr = BLOCK_K // PER_BYTE
    # Grouped ordering of (m, n) tiles so consecutive programs share weight tiles in L2.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, SUB_K)
    k_begin, k_end = split_k_range(pid_k, K, BLOCK_K, SPLIT_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        packed = load_packed(q_ptr, offs_n, k0, N, K, stride_qn, BLOCK_K, PER_BYTE)
        block = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        x_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for p in tl.static_range(PER_BYTE):
            x = load_x_phase(x_ptr, offs_m, k0, offs_j, p, M, K, stride_xm, PER_BYTE)
            v = lut_lookup(lut_ptr, offs_n, phase_codes(packed, p, NBITS), N, 1 << NBITS, LUT_MODE)
            if DOT_FP32:
                # Interpreter only: its bf16 tl.dot is wrong (triton 3.9), fp32 is exact.
                block += tl.dot(x.to(tl.float32), tl.trans(v), input_precision="ieee")
            else:
                block += tl.dot(x, tl.trans(v.to(x.dtype)))  # LUT entries are exact in x's dtype
            x_sum += tl.sum(x.to(tl.float32), axis=1)
        scale, zero = group_scale_zero(s_ptr, z_ptr, offs_n, k0, N, stride_sn, GROUP)
        acc += block * scale[None, :] + x_sum[:, None] * zero[None, :]

    out = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
