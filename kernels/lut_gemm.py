"""Fused LUT GEMM for prefill-sized M (above lut_mma's 64 rows): out = x @ W^T, with W looked up
tile by tile in registers and fed straight to tl.dot, never written to HBM.

Per K step a program loads a (BLOCK_N, BLOCK_K) tile of packed codes (BLOCK_K / 8 32-bit words per
row), looks it up with the byte-permute tree of lut_permute (its rows' LUT planes are built once,
before the loop) and applies the group's scale and zero: with one fma.rn.bf16x2 (f16x2) per pair of
weights when LUT, scales and x share a dtype (PAIR_FMA), else in float32, rounded to x's dtype. BLOCK_K divides the group, so one
scale and zero per row serve a step. PREFETCH loads a step's code words, scales and zeros in the
step before (register double buffer): the ncu profile (benchmarks/results/sweep-gemm-NOTE.md)
shows the kernel latency-bound, one CTA per SM issuing every 2.8 cycles, ALU pipe 26 % busy.

SWAP_AB computes the transposed product acc[n, m] = W_tile @ x_tile^T: the looked-up tile is then
the left operand, which Hopper's wgmma reads from registers (the right one must sit in shared
memory, where the pipelined x loads go). SPLIT_K programs split K in whole steps and write float32
partial sums to part[split]; the last split to finish a tile (an atomic count per tile) adds them
in split order and writes the output (deterministic).

PAIR_DOT (with SWAP_AB and PAIR_FMA) skips assembling the tile in column order. A looked-up uint32
holds the 16-bit weights of columns (8j + 2q, 8j + 2q + 1) of word j, and wgmma's register operand
wants exactly such pairs of adjacent K: so each step runs 4 dots of BLOCK_K / 4, dot q taking the
pairs q of every word as they are, against x with its columns permuted to match (the launcher
permutes x once per call: x_pairs). The column-order tile needed a layout conversion through
shared memory each step (9 bar.sync per step in the SASS, benchmarks/inspect_compile.py); this
path has none (2 bar.sync), and fewer registers (156 against 193 at 128x128x128, 8 warps, no
prefetch).

Under TRITON_INTERPRET=1, tl.dot on bf16 operands returns garbage (triton's interpreter), so the
operands are upcast to float32 there; on the GPU they go to the tensor cores as 16-bit values.
"""

import triton
import triton.language as tl

from any4ao.kernels.lut_permute import halves, lookup8, lookup_phases, lut_byte_planes, scale_pairs


@triton.jit
def _both_halves(v):
    """(BLOCK_N,) 16-bit floats -> uint32 holding their bits in both halves (fma.rn.*x2 operands)."""
    return v.to(tl.uint16, bitcast=True).to(tl.uint32) * 65537


@triton.jit
def _scaled_pairs(words, P, s, z, LUT_FP16: tl.constexpr, USE_ASM: tl.constexpr):
    """(BLOCK_N, W) code words -> 4 uint32 tensors of 16-bit pairs lut * s + z (one pair FMA each),
    columns (8j, 8j + 1), (8j + 2, 8j + 3), (8j + 4, 8j + 5), (8j + 6, 8j + 7) of word j."""
    Pw = (P[0][:, None], P[1][:, None], P[2][:, None], P[3][:, None])
    Pw = Pw + (P[4][:, None], P[5][:, None], P[6][:, None], P[7][:, None])
    p01, p23, p45, p67 = lookup8(
        words, Pw, tl.full((), 1 << 16, tl.uint32), tl.full((), 1 << 31, tl.uint32), 16, USE_ASM
    )
    S = _both_halves(s)[:, None]
    Z = _both_halves(z)[:, None]
    return (
        scale_pairs(p01, S, Z, LUT_FP16, USE_ASM),
        scale_pairs(p23, S, Z, LUT_FP16, USE_ASM),
        scale_pairs(p45, S, Z, LUT_FP16, USE_ASM),
        scale_pairs(p67, S, Z, LUT_FP16, USE_ASM),
    )


@triton.jit
def _lookup_tile(
    words,
    P,
    s,
    z,
    PAIR_FMA: tl.constexpr,
    LUT_FP16: tl.constexpr,
    USE_ASM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(BLOCK_N, BLOCK_K // 8) code words -> (BLOCK_N, BLOCK_K) lut * scale + zero, column order.
    PAIR_FMA (LUT, scales and x of one 16-bit dtype): one fma.rn.bf16x2 (f16x2) per looked-up pair of
    16-bit values gives W in x's dtype, rounded once, as lut_mma does; this halves the registers
    a W tile holds and the instructions per weight against the float32 path (2 unpacks, 2 FMAs and
    a convert per pair), which serves LUTs whose dtype differs from x's."""
    if PAIR_FMA:
        q01, q23, q45, q67 = _scaled_pairs(words, P, s, z, LUT_FP16, USE_ASM)
        v0, v1 = halves(q01, LUT_FP16, False)
        v2, v3 = halves(q23, LUT_FP16, False)
        v4, v5 = halves(q45, LUT_FP16, False)
        v6, v7 = halves(q67, LUT_FP16, False)
    else:
        v0, v1, v2, v3, v4, v5, v6, v7 = lookup_phases(
            words, P[0], P[1], P[2], P[3], P[4], P[5], P[6], P[7], LUT_FP16, USE_ASM, True
        )
        s = s.to(tl.float32)[:, None]
        z = z.to(tl.float32)[:, None]
        v0, v1, v2, v3 = v0 * s + z, v1 * s + z, v2 * s + z, v3 * s + z
        v4, v5, v6, v7 = v4 * s + z, v5 * s + z, v6 * s + z, v7 * s + z
    # join on the slowest index first: (w, a, b, c) flattens to column 8w + 4a + 2b + c
    c0 = tl.join(tl.join(v0, v4), tl.join(v2, v6))
    c1 = tl.join(tl.join(v1, v5), tl.join(v3, v7))
    return tl.reshape(tl.join(c0, c1), (BLOCK_N, BLOCK_K))


@triton.jit
def _step_operands(qw_rows, s_rows, z_rows, nmask, k0, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """The code words (BLOCK_N, BLOCK_K // 8) of the K step at column k0 < K and its group's scale
    and zero per row, in their storage dtype; *_rows point at each row's start (masked rows read zeros)."""
    cols = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    words = tl.load(qw_rows[:, None] + cols[None, :], mask=nmask[:, None], other=0).to(tl.uint32, bitcast=True)
    s = tl.load(s_rows + k0 // GROUP, mask=nmask, other=0.0)
    z = tl.load(z_rows + k0 // GROUP, mask=nmask, other=0.0)
    return words, s, z


@triton.jit
def _pair_dot(acc, x_ptr, offs_m, mmask, stride_xm, col0, pair, LUT_FP16: tl.constexpr, INTERPRET: tl.constexpr):
    """acc += W_q @ x_q^T for one pair slot q: pair (BLOCK_N, W) uint32 holds 16-bit weights of two
    adjacent columns; as (BLOCK_N, 2 W) 16-bit values, K index 2j + h is half h of pair[:, j], and
    columns col0 .. col0 + 2 W - 1 of the permuted x hold the matching x values."""
    lo, hi = halves(pair, LUT_FP16, False)
    a = tl.reshape(tl.join(lo, hi), (lo.shape[0], 2 * lo.shape[1]))
    cols = col0 + tl.arange(0, a.shape[1])
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :], mask=mmask[:, None], other=0.0)
    if INTERPRET:  # bf16 tl.dot is wrong in the interpreter: multiply the 16-bit values in fp32
        a = a.to(tl.float32)
        x = x.to(tl.float32)
    return tl.dot(a, tl.trans(x), acc)


@triton.jit
def _pair_dots(
    acc,
    x_ptr,
    offs_m,
    mmask,
    stride_xm,
    k0,
    words,
    P,
    s,
    z,
    LUT_FP16: tl.constexpr,
    USE_ASM: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One K step of PAIR_DOT: look the words up into 16-bit pairs, scale them by pair FMAs, and
    multiply each pair slot with its quarter of the step's permuted x columns."""
    q01, q23, q45, q67 = _scaled_pairs(words, P, s, z, LUT_FP16, USE_ASM)
    Q: tl.constexpr = BLOCK_K // 4
    acc = _pair_dot(acc, x_ptr, offs_m, mmask, stride_xm, k0, q01, LUT_FP16, INTERPRET)
    acc = _pair_dot(acc, x_ptr, offs_m, mmask, stride_xm, k0 + Q, q23, LUT_FP16, INTERPRET)
    acc = _pair_dot(acc, x_ptr, offs_m, mmask, stride_xm, k0 + 2 * Q, q45, LUT_FP16, INTERPRET)
    acc = _pair_dot(acc, x_ptr, offs_m, mmask, stride_xm, k0 + 3 * Q, q67, LUT_FP16, INTERPRET)
    return acc


@triton.jit
def lut_gemm_kernel(
    x_ptr,
    qw_ptr,
    lutw_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    part_ptr,
    count_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_qw,
    stride_sn,
    stride_os,
    stride_om,
    LUT_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
    LUT_FP16: tl.constexpr,
    PAIR_FMA: tl.constexpr,
    USE_ASM: tl.constexpr,
    PREFETCH: tl.constexpr,
    INTERPRET: tl.constexpr,
    PAIR_DOT: tl.constexpr = False,
):
    # programs of GROUP_M consecutive M tiles share each N tile: neighbours reuse W tiles in L2
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_band = GROUP_M * tiles_n
    band = pid // per_band
    first_m = band * GROUP_M
    band_m = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_band) % band_m
    pid_n = (pid % per_band) // band_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    mmask = offs_m < M
    P = lut_byte_planes(lutw_ptr, offs_n, N, LUT_SIZE, USE_ASM)

    steps = K // BLOCK_K  # the launcher checks K % BLOCK_K == 0
    per_split = tl.cdiv(steps, SPLIT_K)
    first = split * per_split
    last = min(first + per_split, steps)
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    qw_rows, s_rows, z_rows = qw_ptr + offs_n * stride_qw, s_ptr + offs_n * stride_sn, z_ptr + offs_n * stride_sn
    if PREFETCH:  # each step's words, scales and zeros load a step ahead of their lookup, in registers
        words, s, z = _step_operands(qw_rows, s_rows, z_rows, nmask, min(first, steps - 1) * BLOCK_K, GROUP, BLOCK_K)
    for step in range(first, last):
        k0 = step * BLOCK_K
        if PREFETCH:  # the last step re-reads itself (unused): no out-of-range step, no branch
            cur_words, cur_s, cur_z = words, s, z
            words, s, z = _step_operands(
                qw_rows, s_rows, z_rows, nmask, min(step + 1, last - 1) * BLOCK_K, GROUP, BLOCK_K
            )
        else:
            cur_words, cur_s, cur_z = _step_operands(qw_rows, s_rows, z_rows, nmask, k0, GROUP, BLOCK_K)
        if PAIR_DOT:
            acc = _pair_dots(
                acc,
                x_ptr,
                offs_m,
                mmask,
                stride_xm,
                k0,
                cur_words,
                P,
                cur_s,
                cur_z,
                LUT_FP16,
                USE_ASM,
                INTERPRET,
                BLOCK_K,
            )
        else:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=mmask[:, None], other=0.0)
            w = _lookup_tile(cur_words, P, cur_s, cur_z, PAIR_FMA, LUT_FP16, USE_ASM, BLOCK_N, BLOCK_K).to(x.dtype)
            if INTERPRET:  # bf16 tl.dot is wrong in the interpreter: multiply the 16-bit values in fp32
                w = w.to(tl.float32)
                x = x.to(tl.float32)
            if SWAP_AB:
                acc = tl.dot(w, tl.trans(x), acc)
            else:
                acc = tl.dot(x, tl.trans(w), acc)

    if SWAP_AB:
        acc = tl.trans(acc)
    mask = mmask[:, None] & nmask[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # serial split K: each split writes its float32 partial sums, and the split that arrives
        # last at this tile adds all of them in split order (deterministic) and writes the output;
        # one kernel, where a separate sum and cast cost two more launches per call
        part = part_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(part + split * stride_os, acc, mask=mask)
        tl.debug_barrier()  # every thread's partials are written before the count goes up
        arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.load(part, mask=mask, other=0.0, cache_modifier=".cg")  # .cg: not from L1
            for other in tl.static_range(1, SPLIT_K):
                total += tl.load(part + other * stride_os, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out, total.to(out_ptr.dtype.element_ty), mask=mask)
