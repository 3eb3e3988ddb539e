"""LUT lookup in registers with byte permutes (PTX `prmt`), no shared memory and no loads.

Why: the ncu profile of the tl.gather kernels (benchmarks/results/profile-decode-*.md) showed the
decode matmul bound by L1/shared-memory traffic of the LUT gather, not by HBM. Here a row's
16-entry LUT of 16-bit values lives in eight 32-bit registers, split into byte planes:

    L[j] = low bytes of entries 4j .. 4j+3,   H[j] = high bytes of the same entries

`prmt(a, b, sel)` picks, for each of 4 output bytes, one of the 8 bytes of (b:a) by a 3-bit
selector nibble. Four 4-bit codes sit in the low 16 bits of a packed word, one per nibble, so
prmt(L0, L1, codes & 0x7777) looks up the low bytes of four entries 0..7 at once, prmt(L2, L3, ..)
the entries 8..15, and a third prmt picks between them by each code's bit 3. The same for the
high bytes, then two prmts interleave low and high bytes into two pairs of 16-bit LUT values.
About 2 instructions per weight, all in registers.

Packed words: codes are stored two per byte, low nibble first (tensor/packing.py), so the 32-bit
little-endian word w of a row holds columns 8w .. 8w+7 in nibbles 0 .. 7: column order needs no
shuffle. Under TRITON_INTERPRET=1 there is no PTX; `prmt` is then emulated with 64-bit shifts
(same results), which is what the CPU tests run.
"""

import triton
import triton.language as tl


@triton.jit
def prmt(a, b, sel, USE_ASM: tl.constexpr):
    """PTX prmt.b32 in its default mode: byte i of the result is byte (sel >> 4i) & 7 of the 8-byte
    value b:a. Every selector here keeps bit 3 of each nibble clear (no sign-replicate mode)."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            "prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel], dtype=tl.uint32, is_pure=True, pack=1
        )
    else:
        both = (b.to(tl.uint64) << 32) | a.to(tl.uint64)
        sel = sel.to(tl.uint64)
        out = tl.zeros_like(both)
        for i in tl.static_range(4):
            out |= ((both >> (((sel >> (4 * i)) & 7) * 8)) & 0xFF) << (8 * i)
        return out.to(tl.uint32)


@triton.jit
def lut_byte_planes(lut_words_ptr, offs_n, N, LUT_SIZE: tl.constexpr, USE_ASM: tl.constexpr):
    """The 8 byte-plane registers (L0..L3, H0..H3) of each row in offs_n, from the LUT viewed as
    uint32 words (word q = entry 2q | entry 2q+1 << 16). A 3-bit LUT (8 entries) fills L0, L1,
    H0, H1; its codes never set bit 3, so the planes of entries 8..15 are never picked."""
    row = lut_words_ptr + offs_n * (LUT_SIZE // 2)
    nmask = offs_n < N
    w0 = tl.load(row + 0, mask=nmask, other=0).to(tl.uint32, bitcast=True)
    w1 = tl.load(row + 1, mask=nmask, other=0).to(tl.uint32, bitcast=True)
    w2 = tl.load(row + 2, mask=nmask, other=0).to(tl.uint32, bitcast=True)
    w3 = tl.load(row + 3, mask=nmask, other=0).to(tl.uint32, bitcast=True)
    if LUT_SIZE == 16:
        w4 = tl.load(row + 4, mask=nmask, other=0).to(tl.uint32, bitcast=True)
        w5 = tl.load(row + 5, mask=nmask, other=0).to(tl.uint32, bitcast=True)
        w6 = tl.load(row + 6, mask=nmask, other=0).to(tl.uint32, bitcast=True)
        w7 = tl.load(row + 7, mask=nmask, other=0).to(tl.uint32, bitcast=True)
    else:
        w4, w5, w6, w7 = w0, w1, w2, w3
    lows = tl.zeros_like(w0) + 0x6420  # bytes 0, 2 of the first word, then of the second
    highs = tl.zeros_like(w0) + 0x7531
    return (
        prmt(w0, w1, lows, USE_ASM),
        prmt(w2, w3, lows, USE_ASM),
        prmt(w4, w5, lows, USE_ASM),
        prmt(w6, w7, lows, USE_ASM),
        prmt(w0, w1, highs, USE_ASM),
        prmt(w2, w3, highs, USE_ASM),
        prmt(w4, w5, highs, USE_ASM),
        prmt(w6, w7, highs, USE_ASM),
    )


@triton.jit
def lookup8(word, P, pow2_16, pow2_31, LUT_SIZE: tl.constexpr, USE_ASM: tl.constexpr):
    """The 8 codes of a uint32 word (nibble i = column i) -> 4 uint32 pairs of 16-bit LUT values,
    columns (0, 1), (2, 3), (4, 5), (6, 7). P: the row's byte planes (L0..L3, H0..H3). prmt reads only
    the low 16 bits of a selector, so each selector is computed once for all 8 nibbles.
    The shifts are written as umulhi (x >> s == umulhi(x, 2**(32 - s))), with pow2_16 = 2**16 and
    pow2_31 = 2**31 as uint32: in lut_mma, where the permutes keep the ALU pipe busy (ncu: 69 % of
    its peak, the FMA pipe 7 %), they come in as kernel arguments so that mul.hi runs on the FMA
    pipe (as literals, ptxas turns the multiply back into a shift, which is what lookup_phases does)."""
    low3 = word & 0x77777777
    low3_hi = tl.umulhi(low3, pow2_16)  # low3 >> 16
    if LUT_SIZE == 16:
        # nibble i: byte i of the entries 0..7 result, or (code bit 3) byte i + 4 of the 8..15 result
        by_bit3 = (tl.umulhi(word, pow2_31) & 0x44444444) | 0x32103210
        by_bit3_hi = tl.umulhi(by_bit3, pow2_16)
        lo_a = prmt(prmt(P[0], P[1], low3, USE_ASM), prmt(P[2], P[3], low3, USE_ASM), by_bit3, USE_ASM)
        hi_a = prmt(prmt(P[4], P[5], low3, USE_ASM), prmt(P[6], P[7], low3, USE_ASM), by_bit3, USE_ASM)
        lo_b = prmt(prmt(P[0], P[1], low3_hi, USE_ASM), prmt(P[2], P[3], low3_hi, USE_ASM), by_bit3_hi, USE_ASM)
        hi_b = prmt(prmt(P[4], P[5], low3_hi, USE_ASM), prmt(P[6], P[7], low3_hi, USE_ASM), by_bit3_hi, USE_ASM)
    else:  # 3-bit codes: 8 entries, bit 3 never set, one permute per plane
        lo_a, hi_a = prmt(P[0], P[1], low3, USE_ASM), prmt(P[4], P[5], low3, USE_ASM)
        lo_b, hi_b = prmt(P[0], P[1], low3_hi, USE_ASM), prmt(P[4], P[5], low3_hi, USE_ASM)
    first = tl.zeros_like(lo_a) + 0x5140  # (lo0 hi0 lo1 hi1): entries of columns 0, 1
    second = tl.zeros_like(lo_a) + 0x7362
    return (
        prmt(lo_a, hi_a, first, USE_ASM),
        prmt(lo_a, hi_a, second, USE_ASM),
        prmt(lo_b, hi_b, first, USE_ASM),
        prmt(lo_b, hi_b, second, USE_ASM),
    )


@triton.jit
def halves(pair, LUT_FP16: tl.constexpr, F32: tl.constexpr):
    """The two 16-bit values of a uint32 pair, in the LUT dtype or (F32) as float32. A bf16 is the
    top half of its float32, so for bf16 LUTs that takes one bit operation per value."""
    if F32 and not LUT_FP16:
        lo = (pair << 16).to(tl.float32, bitcast=True)
        hi = (pair & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        lo, hi = (pair & 0xFFFF).to(tl.uint16), (pair >> 16).to(tl.uint16)
        if LUT_FP16:
            lo, hi = lo.to(tl.float16, bitcast=True), hi.to(tl.float16, bitcast=True)
        else:
            lo, hi = lo.to(tl.bfloat16, bitcast=True), hi.to(tl.bfloat16, bitcast=True)
        if F32:
            lo, hi = lo.to(tl.float32), hi.to(tl.float32)
    return lo, hi


@triton.jit
def _to_bits(v, FP16: tl.constexpr):
    """float32 -> the uint32 holding its 16-bit (fp16 / bf16) rounding in the low half."""
    if FP16:
        return v.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
    else:
        return v.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)


@triton.jit
def scale_pairs(pair, S, Z, FP16: tl.constexpr, USE_ASM: tl.constexpr):
    """pair * S + Z on both 16-bit halves (S, Z: a row's scale / zero in both halves), rounded once
    (fma.rn.bf16x2 / fma.rn.f16x2; the interpreter computes it in float32, where lut * s is exact)."""
    if USE_ASM:
        if FP16:
            asm: tl.constexpr = "fma.rn.f16x2 $0, $1, $2, $3;"
        else:
            asm: tl.constexpr = "fma.rn.bf16x2 $0, $1, $2, $3;"
        return tl.inline_asm_elementwise(asm, "=r,r,r,r", [pair, S, Z], dtype=tl.uint32, is_pure=True, pack=1)
    else:
        lo, hi = halves(pair, FP16, True)
        s, _ = halves(S, FP16, True)
        z, _ = halves(Z, FP16, True)
        return _to_bits(lo * s + z, FP16) | (_to_bits(hi * s + z, FP16) << 16)


@triton.jit
def lookup_phases(
    words, L0, L1, L2, L3, H0, H1, H2, H3, LUT_FP16: tl.constexpr, USE_ASM: tl.constexpr, F32: tl.constexpr = False
):
    """(BLOCK_N, W) uint32 packed words -> 8 tensors (BLOCK_N, W) of LUT values in the LUT's 16-bit
    dtype (fp16 if LUT_FP16, else bf16; exact) or float32 (F32): phase p holds columns 8w + p.
    Tables are (BLOCK_N,) per row, from lut_byte_planes."""
    P = (L0[:, None], L1[:, None], L2[:, None], L3[:, None], H0[:, None], H1[:, None], H2[:, None], H3[:, None])
    # 16: the full permute tree also serves 3-bit LUTs (lut_byte_planes repeats their planes)
    p01, p23, p45, p67 = lookup8(
        words, P, tl.full((), 1 << 16, tl.uint32), tl.full((), 1 << 31, tl.uint32), 16, USE_ASM
    )
    v0, v1 = halves(p01, LUT_FP16, F32)
    v2, v3 = halves(p23, LUT_FP16, F32)
    v4, v5 = halves(p45, LUT_FP16, F32)
    v6, v7 = halves(p67, LUT_FP16, F32)
    return v0, v1, v2, v3, v4, v5, v6, v7


@triton.jit
def lookup_words(
    words,
    L0,
    L1,
    L2,
    L3,
    H0,
    H1,
    H2,
    H3,
    LUT_FP16: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_ASM: tl.constexpr,
):
    """(BLOCK_N, BLOCK_K // 8) uint32 packed words -> (BLOCK_N, BLOCK_K) LUT values, column order."""
    v0, v1, v2, v3, v4, v5, v6, v7 = lookup_phases(words, L0, L1, L2, L3, H0, H1, H2, H3, LUT_FP16, USE_ASM)
    # tl.join appends a last axis, so join on the slowest index first: (w, a, b, c) flattens to
    # column 8w + 4a + 2b + c. Joins stay in registers (one thread holds all 8 values of a word).
    c0 = tl.join(tl.join(v0, v4), tl.join(v2, v6))
    c1 = tl.join(tl.join(v1, v5), tl.join(v3, v7))
    return tl.reshape(tl.join(c0, c1), (BLOCK_N, BLOCK_K))


@triton.jit
def load_words(qw_ptr, offs_n, k0, N, K, stride_qw, BLOCK_K: tl.constexpr):
    """(BLOCK_N, BLOCK_K // 8) uint32 words of codes for columns k0 .. k0 + BLOCK_K - 1 (K % 8 == 0)."""
    cols = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    mask = (offs_n[:, None] < N) & (cols[None, :] < K // 8)
    return tl.load(qw_ptr + offs_n[:, None] * stride_qw + cols[None, :], mask=mask, other=0).to(tl.uint32, bitcast=True)
