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
        prmt(w0, w1, lows, USE_ASM), prmt(w2, w3, lows, USE_ASM),
        prmt(w4, w5, lows, USE_ASM), prmt(w6, w7, lows, USE_ASM),
        prmt(w0, w1, highs, USE_ASM), prmt(w2, w3, highs, USE_ASM),
        prmt(w4, w5, highs, USE_ASM), prmt(w6, w7, highs, USE_ASM),
    )


@triton.jit
def _lookup4(codes, L0, L1, L2, L3, H0, H1, H2, H3, USE_ASM: tl.constexpr):
    """Four codes in the low 16 bits of `codes` -> two uint32 words, each a pair of 16-bit LUT
    values (code 0 | code 1 << 16, code 2 | code 3 << 16)."""
    low3 = codes & 0x7777
    by_bit3 = ((codes >> 1) & 0x4444) | 0x3210  # nibble i: byte i of the 0..7 half, or i + 4 of the 8..15 half
    lo = prmt(prmt(L0, L1, low3, USE_ASM), prmt(L2, L3, low3, USE_ASM), by_bit3, USE_ASM)
    hi = prmt(prmt(H0, H1, low3, USE_ASM), prmt(H2, H3, low3, USE_ASM), by_bit3, USE_ASM)
    return prmt(lo, hi, tl.zeros_like(lo) + 0x5140, USE_ASM), prmt(lo, hi, tl.zeros_like(lo) + 0x7362, USE_ASM)


@triton.jit
def _halves(pair, LUT_FP16: tl.constexpr, F32: tl.constexpr):
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
def lookup_phases(words, L0, L1, L2, L3, H0, H1, H2, H3, LUT_FP16: tl.constexpr, USE_ASM: tl.constexpr,
                  F32: tl.constexpr = False):
    """(BLOCK_N, W) uint32 packed words -> 8 tensors (BLOCK_N, W) of LUT values in the LUT's 16-bit
    dtype (fp16 if LUT_FP16, else bf16; exact) or float32 (F32): phase p holds columns 8w + p.
    Tables are (BLOCK_N,) per row, from lut_byte_planes."""
    L0, L1, L2, L3 = L0[:, None], L1[:, None], L2[:, None], L3[:, None]
    H0, H1, H2, H3 = H0[:, None], H1[:, None], H2[:, None], H3[:, None]
    p01, p23 = _lookup4(words, L0, L1, L2, L3, H0, H1, H2, H3, USE_ASM)
    p45, p67 = _lookup4(words >> 16, L0, L1, L2, L3, H0, H1, H2, H3, USE_ASM)
    v0, v1 = _halves(p01, LUT_FP16, F32)
    v2, v3 = _halves(p23, LUT_FP16, F32)
    v4, v5 = _halves(p45, LUT_FP16, F32)
    v6, v7 = _halves(p67, LUT_FP16, F32)
    return v0, v1, v2, v3, v4, v5, v6, v7


@triton.jit
def lookup_words(words, L0, L1, L2, L3, H0, H1, H2, H3, LUT_FP16: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr):
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
