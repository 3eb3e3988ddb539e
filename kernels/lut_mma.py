"""Decode matmul (M <= 64) on tensor cores: warp-level mma.sync fed from the register LUT lookup.

Why: the CUDA-core decode kernel (lut_decode, FMA path) is bound by instruction issue, ~7.6
instructions per weight (profile-decode-*.md): after the byte-permute lookup every weight still
needs a bf16 -> fp32 conversion and an FMA. The lookup's output, a pair of 16-bit LUT values of
neighbouring columns in one register, already *is* an mma.m16n8k16 A-fragment register, so here
the products and sums run on tensor cores and only the lookup stays on the CUDA cores (H100, M=1,
28672x4096: 44.4 us against 54.7 for lut_decode; bench_kernels.py).

Fragments (PTX ISA, mma.m16n8k16 with .bf16/.f16 inputs): lane l of a warp, g = l // 4, t = l % 4
    A (16 rows x 16 k)  reg0: row g, k 2t, 2t+1     reg1: row g+8, k 2t, 2t+1
                        reg2: row g, k 2t+8, 2t+9   reg3: row g+8, k 2t+8, 2t+9
    B (16 k x 8 cols)   reg0: k 2t, 2t+1, col g     reg1: k 2t+8, 2t+9, col g
    C (16 x 8, fp32)    c0, c1: row g, cols 2t, 2t+1     c2, c3: row g+8, cols 2t, 2t+1
An mma sums over its 16 k in any order, so k positions are assigned to suit the packing: lane t's
positions {2t, 2t+1, 2t+8, 2t+9} are codes {0, 1, 2, 3} (first mma) or {4, 5, 6, 7} (second mma)
of one 32-bit code word, for weight rows g and g+8 (A) and for the same columns of x (B; a column
of B is a row of x). So out^T = W x^T, a row tile is 16 weight rows, and an n-tile serves up to 8
rows of x (the rest of B is zero; tensor-core time is not what bounds decode). A program takes
1, 2, 4 or 8 n-tiles (M <= 8, 16, 32, 64 rows of x; 8 needs SCALED_A), all fed by the same
looked-up A fragments, and a warp owns ROW_TILES = 1 or 2 row tiles (2: SCALED_A, at most 4
n-tiles), so that each x fragment it loads feeds ROW_TILES mmas: from M = 16 on, the x loads
through L1 are what bounds the kernel (profile-decode-*.md).
Per step lane t reads V consecutive code words of each of its two rows (128-bit loads for V = 4),
or with SPREAD the words t, t + 4, .. (so the 4 lanes' 16-byte x loads of one word are contiguous):
the 4 lanes of a row cover 32 V columns. Warps split into ROW_WARPS (16 ROW_TILES rows each) x K_WARPS
(interleaved groups of K), summed through shared memory at the end: deterministic, no workspace.

Scales and zeros, two ways (SCALED_A):
- off: sum_k (lut s + z) x = s sum_k lut x + z sum_k x per group; the x sums come from a second mma
  with an all-ones A, which puts them straight into the C layout (no shuffles). Needs per n-tile
  12 accumulator registers (group sums, x sums, total) and two mmas per fragment.
- on: each looked-up pair becomes lut s + z with one fma.rn.bf16x2 (f16x2) on the FMA pipe, i.e.
  W rounded to the x dtype once, exactly as dequantize + cuBLAS rounds it. One mma per fragment,
  4 accumulator registers per n-tile; this is what lets a program take 8 n-tiles (M <= 64).
  The dispatcher uses this everywhere (faster at every M in the H100 sweeps); "off" stays for the
  sweeps and as the more exact variant (fp32 scaling).

All tensors in the main loop are "lane tensors", one value per thread, shape (32 * num_warps,).
The mma needs element e on thread e, which is how Triton lays out such a 1-D tensor; the kernel
checks it against %tid.x and writes NaN rather than a wrong result if that ever changes.
Under TRITON_INTERPRET=1 the mma is emulated by assembling the fragments into matrices.
"""

import triton
import triton.language as tl

from any4ao.kernels.lut_permute import halves, lookup8, lut_byte_planes


@triton.jit
def thread_ids(lane, USE_ASM: tl.constexpr):
    """%tid.x of the thread holding each element of a lane tensor (the element index under the interpreter)."""
    if USE_ASM:
        return tl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r,r", [lane], dtype=tl.int32, is_pure=True, pack=1)
    else:
        return lane


@triton.jit
def mma_m16n8k16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, FP16: tl.constexpr, USE_ASM: tl.constexpr):
    """C += A B on one warp, fp32 accumulators; all arguments are lane tensors of one warp-multiple."""
    if USE_ASM:
        if FP16:
            asm: tl.constexpr = "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        else:
            asm: tl.constexpr = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        return tl.inline_asm_elementwise(
            asm + "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};",
            "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f",
            [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1,
        )
    else:
        return _mma_emulated(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, FP16)


@triton.jit
def _pairs(r0, r1, FP16: tl.constexpr):
    """Two uint32 registers of 16-bit pairs -> (L, 2 [j: low/high half], 2 [register]) float32."""
    r0l, r0h = halves(r0.to(tl.uint32, bitcast=True), FP16, True)
    r1l, r1h = halves(r1.to(tl.uint32, bitcast=True), FP16, True)
    return tl.join(tl.join(r0l, r0h), tl.join(r1l, r1h))


@triton.jit
def _mma_emulated(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, FP16: tl.constexpr):
    """Interpreter stand-in for mma_m16n8k16: fragments -> matrices per warp, product, fragments."""
    L: tl.constexpr = a0.shape[0]
    WARPS: tl.constexpr = L // 32
    # A[w, 8h + g, 8q + 2t + j] sits in register (h + 2q) of lane (g, t), half j
    a = tl.join(_pairs(a0, a2, FP16), _pairs(a1, a3, FP16))  # (L, j, q, h)
    a = tl.permute(tl.reshape(a, (WARPS, 8, 4, 2, 2, 2)), (0, 5, 1, 4, 2, 3))  # (w, h, g, q, t, j)
    a = tl.reshape(a, (WARPS, 16, 16))
    # B[w, 8q + 2t + j, g] sits in register q of lane (g, t), half j
    b = tl.permute(tl.reshape(_pairs(b0, b1, FP16), (WARPS, 8, 4, 2, 2)), (0, 4, 2, 3, 1))  # (w, q, t, j, g)
    b = tl.reshape(b, (WARPS, 16, 8))
    c = tl.sum(a[:, :, :, None] * b[:, None, :, :], axis=2)  # (w, 16, 8), float32
    # C[w, 8h + g, 2t + j] goes to c(2h + j) of lane (g, t)
    c = tl.reshape(tl.permute(tl.reshape(c, (WARPS, 2, 8, 4, 2)), (0, 2, 3, 1, 4)), (L, 2, 2))  # (L, h, j)
    j0, j1 = tl.split(c)
    d0, d2 = tl.split(j0)
    d1, d3 = tl.split(j1)
    return c0 + d0, c1 + d1, c2 + d2, c3 + d3


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
def _scale4(p, S, Z, FP16: tl.constexpr, USE_ASM: tl.constexpr):
    """scale_pairs over the 4 pairs one lookup8 gives for a row."""
    return (scale_pairs(p[0], S, Z, FP16, USE_ASM), scale_pairs(p[1], S, Z, FP16, USE_ASM),
            scale_pairs(p[2], S, Z, FP16, USE_ASM), scale_pairs(p[3], S, Z, FP16, USE_ASM))


@triton.jit
def _both_halves(v, rep):
    """A 16-bit float -> uint32 with it in both halves (rep = 2**16 + 1: an IMAD, on the FMA pipe)."""
    return v.to(tl.uint16, bitcast=True).to(tl.uint32) * rep


@triton.jit
def _pairs_of(s0, s1, z0, z1, rep):
    """Two rows' scales and zeros, each in both halves of a uint32 (the fma.rn.*x2 operands)."""
    return _both_halves(s0, rep), _both_halves(s1, rep), _both_halves(z0, rep), _both_halves(z1, rep)


@triton.jit
def _unstack(t, V: tl.constexpr):
    """(L, V) -> its V columns as (L,) tensors, padded to four (register-only: a thread holds its row)."""
    if V == 4:
        even, odd = tl.split(tl.reshape(t, (t.shape[0], 2, 2)))
        c0, c2 = tl.split(even)
        c1, c3 = tl.split(odd)
        return c0, c1, c2, c3
    elif V == 2:
        c0, c1 = tl.split(t)
        return c0, c1, c1, c1
    else:
        c0 = tl.reshape(t, (t.shape[0],))
        return c0, c0, c0, c0


@triton.jit
def _load_x_word(x_row, word, ok, USE_ASM: tl.constexpr):
    """The 4 x pairs (int32) that meet code word `word` (x_row: (L,) pointers to a row of x as int32).
    On the GPU an inline-asm ld.global.nc.v4: the loop's tt.loads are pipelined through shared
    memory by tl.range, which for x (tiny, shared by every warp of the SM) only costs shared memory
    and occupancy; a plain load hits L1. Needs x 16-byte aligned (mma_applies)."""
    ptr = x_row + word * 4
    if USE_ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $5, 0; mov.b32 $0, 0; mov.b32 $1, 0; mov.b32 $2, 0; mov.b32 $3, 0;"
            " @p ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4]; }",
            "=r,=r,=r,=r,l,r", [ptr, ok.to(tl.int32)], dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
            is_pure=True, pack=1,
        )
    else:
        return (tl.load(ptr, mask=ok, other=0), tl.load(ptr + 1, mask=ok, other=0),
                tl.load(ptr + 2, mask=ok, other=0), tl.load(ptr + 3, mask=ok, other=0))


@triton.jit
def _load_step(qw_ptr, u, row0, row1, kw, t, g_begin, g_end, N, stride_qw,
               GROUP: tl.constexpr, V: tl.constexpr, K_WARPS: tl.constexpr, SPREAD: tl.constexpr):
    """Step u of this warp: code words (L, V) of rows g and g+8, the first word's index, the step's
    group and whether that group is inside this split. The 4 lanes of a row cover 4 V consecutive words: lane t takes
    words V t .. V t + V - 1 (one 16-byte load at V = 4), or with SPREAD words t, t + 4, .. (so
    that the 4 lanes' x loads for one word, 16 bytes each, are 64 contiguous bytes of a row of x:
    fewer L1 sectors per load, which is what bounds M >= 16)."""
    STEPS: tl.constexpr = GROUP // (32 * V)
    group = g_begin + kw + K_WARPS * (u // STEPS)
    valid = group < g_end
    base = group * (GROUP // 8) + (u % STEPS) * (4 * V)
    if SPREAD:
        word = base + t
        cols = word[:, None] + 4 * tl.arange(0, V)[None, :]
    else:
        word = tl.multiple_of(base + V * t, V)
        cols = word[:, None] + tl.arange(0, V)[None, :]
    w0 = tl.load(qw_ptr + row0[:, None] * stride_qw + cols, mask=(valid & (row0 < N))[:, None], other=0)
    w1 = tl.load(qw_ptr + row1[:, None] * stride_qw + cols, mask=(valid & (row1 < N))[:, None], other=0)
    w0, w1 = w0.to(tl.uint32, bitcast=True), w1.to(tl.uint32, bitcast=True)
    return w0, w1, word, group, valid


@triton.jit
def _word_mma(a, xq, c, e, ONE, SCALED_A: tl.constexpr, FP16: tl.constexpr, USE_ASM: tl.constexpr):
    """One code word per row: a = 8 A registers (rows g, g+8 interleaved), xq = its 4 x pairs.
    c: weight accumulators, e: x-sum accumulators (the all-ones product, not SCALED_A; all four are
    kept, e2 = e0 and e3 = e1, so the mma's accumulator registers need no copies)."""
    c0, c1, c2, c3 = mma_m16n8k16(a[0], a[1], a[2], a[3], xq[0], xq[1], c[0], c[1], c[2], c[3], FP16, USE_ASM)
    c0, c1, c2, c3 = mma_m16n8k16(a[4], a[5], a[6], a[7], xq[2], xq[3], c0, c1, c2, c3, FP16, USE_ASM)
    if SCALED_A:
        return (c0, c1, c2, c3), e
    e0, e1, e2, e3 = mma_m16n8k16(ONE, ONE, ONE, ONE, xq[0], xq[1], e[0], e[1], e[2], e[3], FP16, USE_ASM)
    e0, e1, e2, e3 = mma_m16n8k16(ONE, ONE, ONE, ONE, xq[2], xq[3], e0, e1, e2, e3, FP16, USE_ASM)
    return (c0, c1, c2, c3), (e0, e1, e2, e3)


@triton.jit
def _tile_mma(a, b, word, x_row, stride_xw, m_row, M, valid, cs, ds, es, ONE, J: tl.constexpr,
              ROW_TILES: tl.constexpr, SCALED_A: tl.constexpr, FP16: tl.constexpr, USE_ASM: tl.constexpr):
    """n-tile J: the A fragments of the warp's first 16 rows (a) and, ROW_TILES = 2, of its next 16
    (b, into ds) against rows m_row + 8 J of x (x_row points at row m_row): one x load, two mmas."""
    xq = _load_x_word(x_row + (8 * J) * stride_xw, word, valid & (m_row + 8 * J < M), USE_ASM)
    c, e = _word_mma(a, xq, cs[J], es[J], ONE, SCALED_A, FP16, USE_ASM)
    d = ds[J]
    if ROW_TILES == 2:
        d, _ = _word_mma(b, xq, d, es[J], ONE, SCALED_A, FP16, USE_ASM)
    return c, e, d


@triton.jit
def _tiles_mma(a, b, word, x_row, stride_xw, m_row, M, valid, cs, ds, es, ONE, N_TILES: tl.constexpr,
               ROW_TILES: tl.constexpr, SCALED_A: tl.constexpr, FP16: tl.constexpr, USE_ASM: tl.constexpr):
    """One code word's A fragments against the x of each n-tile; cs / ds / es: per tile (8 slots,
    the first N_TILES used) the accumulators of the first and second row tile and the x sums."""
    c0, e0, d0 = _tile_mma(a, b, word, x_row, stride_xw, m_row, M, valid, cs, ds, es, ONE, 0, ROW_TILES, SCALED_A,
                           FP16, USE_ASM)
    c1, e1, d1, c2, e2, d2, c3, e3, d3 = cs[1], es[1], ds[1], cs[2], es[2], ds[2], cs[3], es[3], ds[3]
    c4, e4, c5, e5, c6, e6, c7, e7 = cs[4], es[4], cs[5], es[5], cs[6], es[6], cs[7], es[7]
    if N_TILES >= 2:
        c1, e1, d1 = _tile_mma(a, b, word, x_row, stride_xw, m_row, M, valid, cs, ds, es, ONE, 1, ROW_TILES,
                               SCALED_A, FP16, USE_ASM)
    if N_TILES >= 4:
        c2, e2, d2 = _tile_mma(a, b, word, x_row, stride_xw, m_row, M, valid, cs, ds, es, ONE, 2, ROW_TILES,
                               SCALED_A, FP16, USE_ASM)
        c3, e3, d3 = _tile_mma(a, b, word, x_row, stride_xw, m_row, M, valid, cs, ds, es, ONE, 3, ROW_TILES,
                               SCALED_A, FP16, USE_ASM)
    if N_TILES == 8:  # ROW_TILES == 1 (static_assert in the kernel)
        c4, e4, _ = _tile_mma(a, b, word, x_row, stride_xw, m_row, M, valid, cs, ds, es, ONE, 4, 1, SCALED_A, FP16,
                              USE_ASM)
        c5, e5, _ = _tile_mma(a, b, word, x_row, stride_xw, m_row, M, valid, cs, ds, es, ONE, 5, 1, SCALED_A, FP16,
                              USE_ASM)
        c6, e6, _ = _tile_mma(a, b, word, x_row, stride_xw, m_row, M, valid, cs, ds, es, ONE, 6, 1, SCALED_A, FP16,
                              USE_ASM)
        c7, e7, _ = _tile_mma(a, b, word, x_row, stride_xw, m_row, M, valid, cs, ds, es, ONE, 7, 1, SCALED_A, FP16,
                              USE_ASM)
    return ((c0, c1, c2, c3, c4, c5, c6, c7), (d0, d1, d2, d3, ds[4], ds[5], ds[6], ds[7]),
            (e0, e1, e2, e3, e4, e5, e6, e7))


@triton.jit
def _fragments(wa, wb, Pa, Pb, SZ, pow2_16, pow2_31, LUT_SIZE: tl.constexpr, SCALED_A: tl.constexpr,
               FP16: tl.constexpr, USE_ASM: tl.constexpr):
    """One code word of rows g (wa) and g + 8 (wb) -> the 8 A registers of its two mmas, rows
    interleaved; SCALED_A: each pair scaled (SZ: the rows' scale and zero pairs)."""
    p = lookup8(wa, Pa, pow2_16, pow2_31, LUT_SIZE, USE_ASM)
    q = lookup8(wb, Pb, pow2_16, pow2_31, LUT_SIZE, USE_ASM)
    if SCALED_A:
        p = _scale4(p, SZ[0], SZ[2], FP16, USE_ASM)
        q = _scale4(q, SZ[1], SZ[3], FP16, USE_ASM)
    return p[0], q[0], p[1], q[1], p[2], q[2], p[3], q[3]


@triton.jit
def _step_mma(W, word, x_row, stride_xw, m_row, M, valid, P, SZ, cs, ds, es, ONE, pow2_16, pow2_31,
              V: tl.constexpr, LUT_SIZE: tl.constexpr, N_TILES: tl.constexpr, ROW_TILES: tl.constexpr,
              SCALED_A: tl.constexpr, SPREAD: tl.constexpr, FP16: tl.constexpr, USE_ASM: tl.constexpr):
    """All V words of a step: each word is looked up once (and, SCALED_A, scaled) and meets every
    n-tile's x. W, P, SZ: per row tile, the code words, byte planes and scale / zero pairs of its
    two rows (W[2:], P[2:], SZ[1] for the second row tile, used when ROW_TILES = 2)."""
    r0 = _unstack(W[0], V)
    r1 = _unstack(W[1], V)
    r2 = _unstack(W[2], V)
    r3 = _unstack(W[3], V)
    STRIDE: tl.constexpr = 4 if SPREAD else 1
    for i in tl.static_range(V):
        a = _fragments(r0[i], r1[i], P[0], P[1], SZ[0], pow2_16, pow2_31, LUT_SIZE, SCALED_A, FP16, USE_ASM)
        b = a
        if ROW_TILES == 2:
            b = _fragments(r2[i], r3[i], P[2], P[3], SZ[1], pow2_16, pow2_31, LUT_SIZE, SCALED_A, FP16, USE_ASM)
        cs, ds, es = _tiles_mma(a, b, word + STRIDE * i, x_row, stride_xw, m_row, M, valid, cs, ds, es, ONE,
                                N_TILES, ROW_TILES, SCALED_A, FP16, USE_ASM)
    return cs, ds, es


@triton.jit
def _fold(acc, c, e, s0, s1, z0, z1):
    """acc += scale * (sum lut x) + zero * (sum x), per row (g: s0, z0; g+8: s1, z1)."""
    return (acc[0] + s0 * c[0] + z0 * e[0], acc[1] + s0 * c[1] + z0 * e[1],
            acc[2] + s1 * c[2] + z1 * e[2], acc[3] + s1 * c[3] + z1 * e[3])


@triton.jit
def _fold_tiles(accs, cs, es, s0, s1, z0, z1, N_TILES: tl.constexpr):
    """Not SCALED_A, so N_TILES <= 4."""
    a0 = _fold(accs[0], cs[0], es[0], s0, s1, z0, z1)
    a1, a2, a3 = accs[1], accs[2], accs[3]
    if N_TILES >= 2:
        a1 = _fold(a1, cs[1], es[1], s0, s1, z0, z1)
    if N_TILES == 4:
        a2 = _fold(a2, cs[2], es[2], s0, s1, z0, z1)
        a3 = _fold(a3, cs[3], es[3], s0, s1, z0, z1)
    return (a0, a1, a2, a3, accs[4], accs[5], accs[6], accs[7])


@triton.jit
def _store(out_ptr, acc, m0, row0, row1, M, N, stride_om):
    """acc (four (L,) lane values, C layout) -> out[m0 + j, row] for the lanes' rows and columns."""
    tl.store(out_ptr + m0 * stride_om + row0, acc[0], mask=(m0 < M) & (row0 < N))
    tl.store(out_ptr + (m0 + 1) * stride_om + row0, acc[1], mask=(m0 + 1 < M) & (row0 < N))
    tl.store(out_ptr + m0 * stride_om + row1, acc[2], mask=(m0 < M) & (row1 < N))
    tl.store(out_ptr + (m0 + 1) * stride_om + row1, acc[3], mask=(m0 + 1 < M) & (row1 < N))


@triton.jit
def _sum_k_warps(v, ROW_LANES: tl.constexpr, K_WARPS: tl.constexpr):
    """Lane values of the K_WARPS warps that share rows, summed in a fixed order."""
    if K_WARPS == 1:
        return v
    else:
        return tl.sum(tl.reshape(v, (K_WARPS, ROW_LANES)), axis=0)


@triton.jit
def _scales_zeros(s_ptr, z_ptr, row0, row1, group, valid, N, stride_sn):
    """The step's group's scale and zero of rows row0 and row1 (0 outside this split or N)."""
    s0 = tl.load(s_ptr + row0 * stride_sn + group, mask=valid & (row0 < N), other=0.0)
    s1 = tl.load(s_ptr + row1 * stride_sn + group, mask=valid & (row1 < N), other=0.0)
    z0 = tl.load(z_ptr + row0 * stride_sn + group, mask=valid & (row0 < N), other=0.0)
    z1 = tl.load(z_ptr + row1 * stride_sn + group, mask=valid & (row1 < N), other=0.0)
    return s0, s1, z0, z1


@triton.jit
def lut_mma_kernel(
    x_ptr, qw_ptr, lut_words_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K,
    stride_xw, stride_qw, stride_sn, stride_os, stride_om, pow2_16, pow2_31,
    LUT_SIZE: tl.constexpr, GROUP: tl.constexpr, V: tl.constexpr,
    ROW_WARPS: tl.constexpr, K_WARPS: tl.constexpr, N_TILES: tl.constexpr, SPLIT_K: tl.constexpr,
    SCALED_A: tl.constexpr, SPREAD: tl.constexpr, LUT_FP16: tl.constexpr, USE_ASM: tl.constexpr,
    STAGES: tl.constexpr, ROW_TILES: tl.constexpr = 1,
):
    """out[pid_k, m, n] = sum over this split's K of x[m, k] W[n, k], for the 8 N_TILES rows of x of
    program_id(2) (N_TILES = 1, 2, 4, or 8 with SCALED_A). A warp owns 16 ROW_TILES weight rows:
    with ROW_TILES = 2 (SCALED_A, N_TILES <= 4) each x fragment it loads feeds two mmas, which
    halves the x traffic through L1 that bounds M >= 16 (profile-decode-*.md).
    x_ptr / qw_ptr / lut_words_ptr: x, codes and LUT viewed as int32 (strides in 32-bit words);
    pow2_16 = 2**16 and pow2_31 = 2**31 (see lookup8)."""
    tl.static_assert(N_TILES == 1 or N_TILES == 2 or N_TILES == 4 or (N_TILES == 8 and SCALED_A))
    tl.static_assert(ROW_TILES == 1 or (ROW_TILES == 2 and SCALED_A and N_TILES <= 4))
    ROW_LANES: tl.constexpr = 32 * ROW_WARPS
    ROWS: tl.constexpr = 16 * ROW_TILES  # weight rows per warp
    L: tl.constexpr = ROW_LANES * K_WARPS
    pow2_16, pow2_31 = pow2_16.to(tl.uint32), pow2_31.to(tl.uint32)
    STEPS: tl.constexpr = GROUP // (32 * V)  # steps per group
    lane = tl.arange(0, L)
    in_place = thread_ids(lane, USE_ASM) == lane
    warp = lane // 32
    g = (lane % 32) // 4
    t = lane % 4
    kw = warp // ROW_WARPS
    row0 = tl.program_id(0) * (ROWS * ROW_WARPS) + (warp % ROW_WARPS) * ROWS + g
    row1 = row0 + 8
    row2 = row0 + 16  # the second row tile (ROW_TILES = 2)
    row3 = row0 + 24
    P0 = lut_byte_planes(lut_words_ptr, row0, N, LUT_SIZE, USE_ASM)
    P1 = lut_byte_planes(lut_words_ptr, row1, N, LUT_SIZE, USE_ASM)
    P2, P3 = P0, P1
    if ROW_TILES == 2:
        P2 = lut_byte_planes(lut_words_ptr, row2, N, LUT_SIZE, USE_ASM)
        P3 = lut_byte_planes(lut_words_ptr, row3, N, LUT_SIZE, USE_ASM)
    ONE = tl.zeros_like(lane) + (0x3C003C00 if LUT_FP16 else 0x3F803F80)  # a pair of 1.0
    m_row = tl.program_id(2) * (8 * N_TILES) + g  # lane (g, t) feeds rows m_row + 8 j of x (n-tile j)
    x_row = x_ptr + m_row * stride_xw

    # This split's groups; warp kw takes groups g_begin + kw, + kw + K_WARPS, ...
    n_groups = K // GROUP
    per_split = tl.cdiv(n_groups, SPLIT_K)
    g_begin = tl.program_id(1) * per_split
    g_end = tl.minimum(g_begin + per_split, n_groups)
    n_steps = tl.cdiv(g_end - g_begin, K_WARPS) * STEPS

    zero = tl.zeros((L,), dtype=tl.float32)
    zeros4 = (zero, zero, zero, zero)  # accumulators: per n-tile, four lane tensors (the C registers)
    zeros8 = (zeros4, zeros4, zeros4, zeros4, zeros4, zeros4, zeros4, zeros4)
    accs, cs, ds, es = zeros8, zeros8, zeros8, zeros8
    rep = pow2_16 + 1
    # tl.range pipelines the code-word loads (cp.async into shared memory, STAGES deep): a plain
    # one-step-ahead prefetch in registers was sunk by ptxas to the end of the loop body. x is read
    # inside _step_mma (L1-cached, see _load_x_word); scales and zeros are plain loads.
    for u in tl.range(0, n_steps, num_stages=STAGES):
        w0, w1, word, group, valid = _load_step(qw_ptr, u, row0, row1, kw, t, g_begin, g_end, N, stride_qw, GROUP,
                                                V, K_WARPS, SPREAD)
        s0, s1, z0, z1 = _scales_zeros(s_ptr, z_ptr, row0, row1, group, valid, N, stride_sn)
        SZ = _pairs_of(s0, s1, z0, z1, rep)
        w2, w3, SZ2 = w0, w1, SZ
        if ROW_TILES == 2:
            w2, w3, _, _, _ = _load_step(qw_ptr, u, row2, row3, kw, t, g_begin, g_end, N, stride_qw, GROUP, V,
                                         K_WARPS, SPREAD)
            s2, s3, z2, z3 = _scales_zeros(s_ptr, z_ptr, row2, row3, group, valid, N, stride_sn)
            SZ2 = _pairs_of(s2, s3, z2, z3, rep)
        cs, ds, es = _step_mma((w0, w1, w2, w3), word, x_row, stride_xw, m_row, M, valid, (P0, P1, P2, P3),
                               (SZ, SZ2), cs, ds, es, ONE, pow2_16, pow2_31, V, LUT_SIZE, N_TILES, ROW_TILES,
                               SCALED_A, SPREAD, LUT_FP16, USE_ASM)
        if not SCALED_A:
            if u % STEPS == STEPS - 1:  # end of a group: apply its scales and zeros
                accs = _fold_tiles(accs, cs, es, s0.to(tl.float32), s1.to(tl.float32), z0.to(tl.float32),
                                   z1.to(tl.float32), N_TILES)
                cs, es = zeros8, zeros8
    if SCALED_A:  # the scales went into the fragments: the mma sums are the result
        accs = cs

    # Warps that share rows meet here; NaN marks a layout that broke the element-to-thread map.
    bad = tl.where(in_place, 0.0, float("nan"))
    out_lane = tl.arange(0, ROW_LANES)
    r0 = tl.program_id(0) * (ROWS * ROW_WARPS) + (out_lane // 32) * ROWS + (out_lane % 32) // 4
    m0 = tl.program_id(2) * (8 * N_TILES) + 2 * (out_lane % 4)
    out = out_ptr + tl.program_id(1) * stride_os
    for r in tl.static_range(ROW_TILES):
        for j in tl.static_range(N_TILES):
            if r == 0:
                acc = accs[j]
            else:
                acc = ds[j]
            acc = (_sum_k_warps(acc[0] + bad, ROW_LANES, K_WARPS), _sum_k_warps(acc[1] + bad, ROW_LANES, K_WARPS),
                   _sum_k_warps(acc[2] + bad, ROW_LANES, K_WARPS), _sum_k_warps(acc[3] + bad, ROW_LANES, K_WARPS))
            _store(out, acc, m0 + 8 * j, r0 + 16 * r, r0 + 16 * r + 8, M, N, stride_om)
