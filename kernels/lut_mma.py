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
1, 2, 4 or 8 n-tiles (M <= 8, 16, 32, 64 rows of x), all fed by the same looked-up A
fragments, and a warp owns ROW_TILES = 1 or 2 row tiles (2: at most 4 n-tiles), so that each x fragment it loads feeds ROW_TILES mmas: from M = 16 on, the x loads
through L1 are what bounds the kernel (profile-decode-*.md).
Per step lane t reads V consecutive code words of each of its two rows (128-bit loads for V = 4),
or with SPREAD the words t, t + 4, .. (so the 4 lanes' 16-byte x loads of one word are contiguous):
the 4 lanes of a row cover 32 V columns. Warps split into ROW_WARPS (16 ROW_TILES rows each) x K_WARPS
(interleaved groups of K), summed through shared memory at the end: deterministic, no workspace.

Scales and zero points: each looked-up pair becomes lut * s + z with one fma.rn.bf16x2 (f16x2)
on the FMA pipe, i.e. W rounded to the x dtype once, exactly as dequantize + cuBLAS rounds it; one
mma per fragment and 4 accumulator registers per n-tile, which is what lets a program take 8
n-tiles (M <= 64). (The variant that applied them after the mma, with an all-ones mma for the x
sums, lost at every M in the H100 sweeps v10 / v11 and was removed; so were the shared-memory
code pipeline, which put two barriers in every step (sweep v14), and the register cap (v9).)

All tensors in the main loop are "lane tensors", one value per thread, shape (32 * num_warps,).
The mma needs element e on thread e, which is how Triton lays out such a 1-D tensor; the kernel
checks it against %tid.x and writes NaN rather than a wrong result if that ever changes.
Under TRITON_INTERPRET=1 the mma is emulated by assembling the fragments into matrices.
"""

import triton
import triton.language as tl

from any4ao.kernels.lut_permute import halves, lookup8, lut_byte_planes, scale_pairs


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
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
            is_pure=True,
            pack=1,
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
def _scale4(p, S, Z, FP16: tl.constexpr, USE_ASM: tl.constexpr):
    """scale_pairs over the 4 pairs one lookup8 gives for a row."""
    return (
        scale_pairs(p[0], S, Z, FP16, USE_ASM),
        scale_pairs(p[1], S, Z, FP16, USE_ASM),
        scale_pairs(p[2], S, Z, FP16, USE_ASM),
        scale_pairs(p[3], S, Z, FP16, USE_ASM),
    )


@triton.jit
def _both_halves(v, rep):
    """16-bit float bits, zero-extended to uint32 (_load_u16) -> both halves (rep = 2**16 + 1: an
    IMAD, on the FMA pipe)."""
    return v * rep


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
def _load_x_word(x_row, word, ok, EVEN: tl.constexpr, USE_ASM: tl.constexpr):
    """The 4 x pairs (int32) that meet code word `word` (x_row: (L,) pointers to a row of x as int32,
    clamped into x, so only `ok`, the step's group being in this split, can fail; EVEN: it never
    does, and the load needs no predicate nor zero fill). On the GPU an inline-asm
    ld.global.nc.v4: a tt.load in the loop would be pipelined through shared memory by tl.range,
    which for x (tiny, shared by every warp of the SM) only costs shared memory and occupancy; a
    plain load hits L1. Needs x 16-byte aligned (mma_applies)."""
    ptr = x_row + word * 4
    if USE_ASM:
        if EVEN:
            return tl.inline_asm_elementwise(
                "ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];",
                "=r,=r,=r,=r,l",
                [ptr],
                dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
                is_pure=True,
                pack=1,
            )
        else:
            return tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.b32 p, $5, 0; mov.b32 $0, 0; mov.b32 $1, 0; mov.b32 $2, 0; mov.b32 $3, 0;"
                " @p ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4]; }",
                "=r,=r,=r,=r,l,r",
                [ptr, ok.to(tl.int32)],
                dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
                is_pure=True,
                pack=1,
            )
    else:
        return (
            tl.load(ptr, mask=ok, other=0),
            tl.load(ptr + 1, mask=ok, other=0),
            tl.load(ptr + 2, mask=ok, other=0),
            tl.load(ptr + 3, mask=ok, other=0),
        )


@triton.jit
def _load_u16(ptr, USE_ASM: tl.constexpr):
    """A 16-bit value (scale or zero) as a zero-extended uint32: ld.global.nc.u16 into a 32-bit
    register zero-extends, which a tl.load + bitcast leaves to a separate AND. Never masked: a
    step outside its split reads the last group's (_step_at), and its x is 0."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            "ld.global.nc.u16 $0, [$1];", "=r,l", [ptr], dtype=tl.uint32, is_pure=True, pack=1
        )
    else:
        return tl.load(ptr).to(tl.uint16, bitcast=True).to(tl.uint32)


@triton.jit
def _load_words_asm(ptr, V: tl.constexpr, SPREAD: tl.constexpr):
    """V code words of a row for one lane, straight into registers (PREFETCH): 16 / 8 / 4 bytes at
    ptr, or with SPREAD words 0, 4, 8, 12 (16 bytes apart). Padded to four like _unstack."""
    if SPREAD:
        if V == 4:
            return tl.inline_asm_elementwise(
                "ld.global.nc.b32 $0, [$4]; ld.global.nc.b32 $1, [$4+16]; ld.global.nc.b32 $2, [$4+32];"
                " ld.global.nc.b32 $3, [$4+48];",
                "=r,=r,=r,=r,l",
                [ptr],
                dtype=(tl.uint32, tl.uint32, tl.uint32, tl.uint32),
                is_pure=True,
                pack=1,
            )
        elif V == 2:
            w0, w1 = tl.inline_asm_elementwise(
                "ld.global.nc.b32 $0, [$2]; ld.global.nc.b32 $1, [$2+16];",
                "=r,=r,l",
                [ptr],
                dtype=(tl.uint32, tl.uint32),
                is_pure=True,
                pack=1,
            )
            return w0, w1, w1, w1
    if V == 4:
        return tl.inline_asm_elementwise(
            "ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];",
            "=r,=r,=r,=r,l",
            [ptr],
            dtype=(tl.uint32, tl.uint32, tl.uint32, tl.uint32),
            is_pure=True,
            pack=1,
        )
    elif V == 2:
        w0, w1 = tl.inline_asm_elementwise(
            "ld.global.nc.v2.b32 {$0, $1}, [$2];", "=r,=r,l", [ptr], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1
        )
        return w0, w1, w1, w1
    else:
        w0 = tl.inline_asm_elementwise(
            "ld.global.nc.b32 $0, [$1];", "=r,l", [ptr], dtype=tl.uint32, is_pure=True, pack=1
        )
        return w0, w0, w0, w0


@triton.jit
def _step_at(
    u,
    at,
    GROUP: tl.constexpr,
    V: tl.constexpr,
    K_WARPS: tl.constexpr,
    SPREAD: tl.constexpr,
    EVEN: tl.constexpr,
):
    """Step u of this warp: its lane's first code word, the step's group, and whether that group is
    inside this split (EVEN: always). A step outside it (a warp with one group fewer than others)
    reads the last group's codes and scales, so every address is inside the tensors; its x is
    loaded as 0, so it adds nothing. The 4 lanes of a row cover 4 V consecutive words: lane t
    takes words V t .. V t + V - 1 (one 16-byte load at V = 4), or with SPREAD words t, t + 4, ..
    (so that the 4 lanes' x loads for one word, 16 bytes each, are 64 contiguous bytes of a row of
    x: fewer L1 sectors per load, which is what bounds M >= 16)."""
    kw, t, g_begin, g_end, n_groups = at[0], at[1], at[2], at[3], at[4]
    STEPS: tl.constexpr = GROUP // (32 * V)
    group = g_begin + kw + K_WARPS * (u // STEPS)
    valid = group < g_end
    if not EVEN:
        group = tl.minimum(group, n_groups - 1)
    base = group * (GROUP // 8) + (u % STEPS) * (4 * V)
    if SPREAD:
        word = base + t
    else:
        word = tl.multiple_of(base + V * t, V)
    return word, group, valid


@triton.jit
def _load_codes(qw_ptr, row, word, stride_qw, V: tl.constexpr, SPREAD: tl.constexpr, ASM_LOAD: tl.constexpr):
    """A row's V code words of a step (row and word inside the weight: no mask), as four (L,)
    uint32 (padded). ASM_LOAD (the GPU): straight into registers; else (the interpreter) tl.load."""
    if ASM_LOAD:
        return _load_words_asm(qw_ptr + row * stride_qw + word, V, SPREAD)
    else:
        STRIDE: tl.constexpr = 4 if SPREAD else 1
        cols = word[:, None] + STRIDE * tl.arange(0, V)[None, :]
        w = tl.load(qw_ptr + row[:, None] * stride_qw + cols)
        return _unstack(w.to(tl.uint32, bitcast=True), V)


@triton.jit
def _fetch_pair(
    qw_ptr,
    s_ptr,
    z_ptr,
    ra,
    rb,
    word,
    group,
    stride_qw,
    stride_sn,
    V: tl.constexpr,
    SPREAD: tl.constexpr,
    ASM_LOAD: tl.constexpr,
    USE_ASM: tl.constexpr,
):
    """Code words, scales and zeros of one row pair (rows g and g + 8 of a row tile) for one step."""
    wa = _load_codes(qw_ptr, ra, word, stride_qw, V, SPREAD, ASM_LOAD)
    wb = _load_codes(qw_ptr, rb, word, stride_qw, V, SPREAD, ASM_LOAD)
    sa = _load_u16(s_ptr + ra * stride_sn + group, USE_ASM)
    sb = _load_u16(s_ptr + rb * stride_sn + group, USE_ASM)
    za = _load_u16(z_ptr + ra * stride_sn + group, USE_ASM)
    zb = _load_u16(z_ptr + rb * stride_sn + group, USE_ASM)
    return wa, wb, sa, sb, za, zb


@triton.jit
def _fetch(
    weight,
    u,
    rows,
    at,
    GROUP: tl.constexpr,
    V: tl.constexpr,
    K_WARPS: tl.constexpr,
    SPREAD: tl.constexpr,
    EVEN: tl.constexpr,
    ROW_TILES: tl.constexpr,
    ASM_LOAD: tl.constexpr,
    USE_ASM: tl.constexpr,
):
    """Everything step u reads from the weight: the code words of the warp's rows (rows: 4 row
    indices, clamped; the last two only with ROW_TILES = 2) and their scales and zeros, as
    zero-extended 16-bit bits. weight: (codes, scales, zero points, their row strides); at: where
    this lane's steps are (see the kernel)."""
    qw_ptr, s_ptr, z_ptr, stride_qw, stride_sn = weight[0], weight[1], weight[2], weight[3], weight[4]
    word, group, valid = _step_at(u, at, GROUP, V, K_WARPS, SPREAD, EVEN)
    w0, w1, s0, s1, z0, z1 = _fetch_pair(
        qw_ptr, s_ptr, z_ptr, rows[0], rows[1], word, group, stride_qw, stride_sn, V, SPREAD, ASM_LOAD, USE_ASM
    )
    w2, w3, s2, s3, z2, z3 = w0, w1, s0, s1, z0, z1
    if ROW_TILES == 2:
        w2, w3, s2, s3, z2, z3 = _fetch_pair(
            qw_ptr, s_ptr, z_ptr, rows[2], rows[3], word, group, stride_qw, stride_sn, V, SPREAD, ASM_LOAD, USE_ASM
        )
    return (w0, w1, w2, w3), (s0, s1, z0, z1, s2, s3, z2, z3)


@triton.jit
def _word_mma(a, xq, c, FP16: tl.constexpr, USE_ASM: tl.constexpr):
    """One code word per row: a = 8 scaled A registers (rows g, g+8 interleaved), xq = its 4 x pairs."""
    c0, c1, c2, c3 = mma_m16n8k16(a[0], a[1], a[2], a[3], xq[0], xq[1], c[0], c[1], c[2], c[3], FP16, USE_ASM)
    return mma_m16n8k16(a[4], a[5], a[6], a[7], xq[2], xq[3], c0, c1, c2, c3, FP16, USE_ASM)


@triton.jit
def _tile_mma(
    a,
    b,
    word,
    xr,
    valid,
    cs,
    ds,
    J: tl.constexpr,
    ROW_TILES: tl.constexpr,
    EVEN: tl.constexpr,
    FP16: tl.constexpr,
    USE_ASM: tl.constexpr,
):
    """n-tile J: the A fragments of the warp's first 16 rows (a) and, ROW_TILES = 2, of its next 16
    (b, into ds) against the lanes' row of x of that tile (xr[J]): one x load, two mmas."""
    xq = _load_x_word(xr[J], word, valid, EVEN, USE_ASM)
    c = _word_mma(a, xq, cs[J], FP16, USE_ASM)
    d = ds[J]
    if ROW_TILES == 2:
        d = _word_mma(b, xq, d, FP16, USE_ASM)
    return c, d


@triton.jit
def _tiles_mma(
    a,
    b,
    word,
    xr,
    valid,
    cs,
    ds,
    N_TILES: tl.constexpr,
    ROW_TILES: tl.constexpr,
    EVEN: tl.constexpr,
    FP16: tl.constexpr,
    USE_ASM: tl.constexpr,
):
    """One code word's A fragments against the x of each n-tile; cs / ds: per tile (8 slots, the
    first N_TILES used) the accumulators of the first and second row tile."""
    c0, d0 = _tile_mma(a, b, word, xr, valid, cs, ds, 0, ROW_TILES, EVEN, FP16, USE_ASM)
    c1, d1, c2, d2, c3, d3 = cs[1], ds[1], cs[2], ds[2], cs[3], ds[3]
    c4, c5, c6, c7 = cs[4], cs[5], cs[6], cs[7]
    if N_TILES >= 2:
        c1, d1 = _tile_mma(a, b, word, xr, valid, cs, ds, 1, ROW_TILES, EVEN, FP16, USE_ASM)
    if N_TILES >= 4:
        c2, d2 = _tile_mma(a, b, word, xr, valid, cs, ds, 2, ROW_TILES, EVEN, FP16, USE_ASM)
        c3, d3 = _tile_mma(a, b, word, xr, valid, cs, ds, 3, ROW_TILES, EVEN, FP16, USE_ASM)
    if N_TILES == 8:  # ROW_TILES == 1 (static_assert in the kernel)
        c4, _ = _tile_mma(a, b, word, xr, valid, cs, ds, 4, 1, EVEN, FP16, USE_ASM)
        c5, _ = _tile_mma(a, b, word, xr, valid, cs, ds, 5, 1, EVEN, FP16, USE_ASM)
        c6, _ = _tile_mma(a, b, word, xr, valid, cs, ds, 6, 1, EVEN, FP16, USE_ASM)
        c7, _ = _tile_mma(a, b, word, xr, valid, cs, ds, 7, 1, EVEN, FP16, USE_ASM)
    return (c0, c1, c2, c3, c4, c5, c6, c7), (d0, d1, d2, d3, ds[4], ds[5], ds[6], ds[7])


@triton.jit
def _fragments(wa, wb, Pa, Pb, SZ, pow2_16, pow2_31, LUT_SIZE: tl.constexpr, FP16: tl.constexpr, USE_ASM: tl.constexpr):
    """One code word of rows g (wa) and g + 8 (wb) -> the 8 A registers of its two mmas, rows
    interleaved, each pair scaled (SZ: the rows' scale and zero pairs)."""
    p = _scale4(lookup8(wa, Pa, pow2_16, pow2_31, LUT_SIZE, USE_ASM), SZ[0], SZ[2], FP16, USE_ASM)
    q = _scale4(lookup8(wb, Pb, pow2_16, pow2_31, LUT_SIZE, USE_ASM), SZ[1], SZ[3], FP16, USE_ASM)
    return p[0], q[0], p[1], q[1], p[2], q[2], p[3], q[3]


@triton.jit
def _step(
    W,
    S,
    u,
    at,
    xr,
    P,
    cs,
    ds,
    rep,
    pow2_16,
    pow2_31,
    GROUP: tl.constexpr,
    V: tl.constexpr,
    K_WARPS: tl.constexpr,
    LUT_SIZE: tl.constexpr,
    N_TILES: tl.constexpr,
    ROW_TILES: tl.constexpr,
    SPREAD: tl.constexpr,
    EVEN: tl.constexpr,
    FP16: tl.constexpr,
    USE_ASM: tl.constexpr,
):
    """Step u on its fetched codes W and scale / zero bits S (_fetch): all V words of the step,
    each looked up and scaled once and multiplied with every n-tile's x. W, P, S: per row tile,
    the code words (four per row), byte planes and scale / zero bits of its two rows (the second
    row tile's used when ROW_TILES = 2)."""
    STRIDE: tl.constexpr = 4 if SPREAD else 1
    word, group, valid = _step_at(u, at, GROUP, V, K_WARPS, SPREAD, EVEN)
    SZ = _pairs_of(S[0], S[1], S[2], S[3], rep)
    SZ2 = SZ
    if ROW_TILES == 2:
        SZ2 = _pairs_of(S[4], S[5], S[6], S[7], rep)
    for i in tl.static_range(V):
        a = _fragments(W[0][i], W[1][i], P[0], P[1], SZ, pow2_16, pow2_31, LUT_SIZE, FP16, USE_ASM)
        b = a
        if ROW_TILES == 2:
            b = _fragments(W[2][i], W[3][i], P[2], P[3], SZ2, pow2_16, pow2_31, LUT_SIZE, FP16, USE_ASM)
        cs, ds = _tiles_mma(a, b, word + STRIDE * i, xr, valid, cs, ds, N_TILES, ROW_TILES, EVEN, FP16, USE_ASM)
    return cs, ds


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
def _clamp_step(v, n_steps):
    """A step index inside 0 .. n_steps - 1 (prefetches past the last step re-read it, unused)."""
    return tl.maximum(tl.minimum(v, n_steps - 1), 0)


@triton.jit
def lut_mma_kernel(
    x_ptr,
    qw_ptr,
    lut_words_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xw,
    stride_qw,
    stride_sn,
    stride_os,
    stride_om,
    pow2_16,
    pow2_31,
    LUT_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    V: tl.constexpr,
    ROW_WARPS: tl.constexpr,
    K_WARPS: tl.constexpr,
    N_TILES: tl.constexpr,
    SPLIT_K: tl.constexpr,
    SPREAD: tl.constexpr,
    LUT_FP16: tl.constexpr,
    USE_ASM: tl.constexpr,
    ROW_TILES: tl.constexpr,
    PREFETCH: tl.constexpr,
    EVEN: tl.constexpr,
):
    """out[pid_k, m, n] = sum over this split's K of x[m, k] W[n, k], for the 8 N_TILES rows of x of
    program_id(2) (N_TILES = 1, 2, 4 or 8). A warp owns 16 ROW_TILES weight rows: with ROW_TILES = 2
    (N_TILES <= 4) each x fragment it loads feeds two mmas, which halves the x traffic through L1
    that bounds M >= 16 (profile-decode-*.md).
    Loads: each step loads the codes and scales of the step PREFETCH (1 or 2) ahead straight into
    registers (no shared memory, no barriers: the warps of a program run independently). EVEN
    (host: every warp gets the same number of groups): no step falls outside its split, so no load
    needs a predicate. Rows of W past N and of x past M are clamped to the last one (their results
    are not stored), so only the split bound can mask a load.
    x_ptr / qw_ptr / lut_words_ptr: x, codes and LUT viewed as int32 (strides in 32-bit words);
    pow2_16 = 2**16 and pow2_31 = 2**31 (see lookup8)."""
    tl.static_assert(N_TILES == 1 or N_TILES == 2 or N_TILES == 4 or N_TILES == 8)
    tl.static_assert(ROW_TILES == 1 or (ROW_TILES == 2 and N_TILES <= 4))
    tl.static_assert(PREFETCH == 1 or PREFETCH == 2)
    ROW_LANES: tl.constexpr = 32 * ROW_WARPS
    ROWS: tl.constexpr = 16 * ROW_TILES  # weight rows per warp
    L: tl.constexpr = ROW_LANES * K_WARPS
    pow2_16, pow2_31 = pow2_16.to(tl.uint32), pow2_31.to(tl.uint32)
    lane = tl.arange(0, L)
    in_place = thread_ids(lane, USE_ASM) == lane
    warp = lane // 32
    g = (lane % 32) // 4
    t = lane % 4
    kw = warp // ROW_WARPS
    row0 = tl.program_id(0) * (ROWS * ROW_WARPS) + (warp % ROW_WARPS) * ROWS + g
    rows = (
        tl.minimum(row0, N - 1),
        tl.minimum(row0 + 8, N - 1),  # the second row tile: rows + 16
        tl.minimum(row0 + 16, N - 1),
        tl.minimum(row0 + 24, N - 1),
    )
    P0 = lut_byte_planes(lut_words_ptr, rows[0], N, LUT_SIZE, USE_ASM)
    P1 = lut_byte_planes(lut_words_ptr, rows[1], N, LUT_SIZE, USE_ASM)
    P2, P3 = P0, P1
    if ROW_TILES == 2:
        P2 = lut_byte_planes(lut_words_ptr, rows[2], N, LUT_SIZE, USE_ASM)
        P3 = lut_byte_planes(lut_words_ptr, rows[3], N, LUT_SIZE, USE_ASM)
    P = (P0, P1, P2, P3)
    # lane (g, t) feeds row m_row + 8 j of x to n-tile j (xr[j], clamped into x)
    m_row = tl.program_id(2) * (8 * N_TILES) + g
    xr = (
        x_ptr + tl.minimum(m_row, M - 1) * stride_xw,
        x_ptr + tl.minimum(m_row + 8, M - 1) * stride_xw,
        x_ptr + tl.minimum(m_row + 16, M - 1) * stride_xw,
        x_ptr + tl.minimum(m_row + 24, M - 1) * stride_xw,
        x_ptr + tl.minimum(m_row + 32, M - 1) * stride_xw,
        x_ptr + tl.minimum(m_row + 40, M - 1) * stride_xw,
        x_ptr + tl.minimum(m_row + 48, M - 1) * stride_xw,
        x_ptr + tl.minimum(m_row + 56, M - 1) * stride_xw,
    )

    # This split's groups; warp kw takes groups g_begin + kw, + kw + K_WARPS, ...
    n_groups = K // GROUP
    per_split = tl.cdiv(n_groups, SPLIT_K)
    g_begin = tl.program_id(1) * per_split
    g_end = tl.minimum(g_begin + per_split, n_groups)
    n_steps = tl.cdiv(g_end - g_begin, K_WARPS) * (GROUP // (32 * V))

    zero = tl.zeros((L,), dtype=tl.float32)
    zeros4 = (zero, zero, zero, zero)  # accumulators: per n-tile, four lane tensors (the C registers)
    zeros8 = (zeros4, zeros4, zeros4, zeros4, zeros4, zeros4, zeros4, zeros4)
    cs, ds = zeros8, zeros8
    rep = pow2_16 + 1
    weight = (qw_ptr, s_ptr, z_ptr, stride_qw, stride_sn)
    at = (kw, t, g_begin, g_end, n_groups)  # this lane's K warp, its lane in a row, this split's groups
    Wa, Sa = _fetch(
        weight, _clamp_step(0, n_steps), rows, at, GROUP, V, K_WARPS, SPREAD, EVEN, ROW_TILES, USE_ASM, USE_ASM
    )
    Wb, Sb = Wa, Sa
    if PREFETCH == 2:
        Wb, Sb = _fetch(
            weight, _clamp_step(1, n_steps), rows, at, GROUP, V, K_WARPS, SPREAD, EVEN, ROW_TILES, USE_ASM, USE_ASM
        )
    for u in tl.range(0, n_steps, num_stages=1):
        ahead = _clamp_step(u + PREFETCH, n_steps)
        Wn, Sn = _fetch(weight, ahead, rows, at, GROUP, V, K_WARPS, SPREAD, EVEN, ROW_TILES, USE_ASM, USE_ASM)
        cs, ds = _step(
            Wa,
            Sa,
            u,
            at,
            xr,
            P,
            cs,
            ds,
            rep,
            pow2_16,
            pow2_31,
            GROUP,
            V,
            K_WARPS,
            LUT_SIZE,
            N_TILES,
            ROW_TILES,
            SPREAD,
            EVEN,
            LUT_FP16,
            USE_ASM,
        )
        if PREFETCH == 2:
            Wa, Sa, Wb, Sb = Wb, Sb, Wn, Sn
        else:
            Wa, Sa = Wn, Sn

    # Warps that share rows meet here; NaN marks a layout that broke the element-to-thread map.
    bad = tl.where(in_place, 0.0, float("nan"))
    out_lane = tl.arange(0, ROW_LANES)
    r0 = tl.program_id(0) * (ROWS * ROW_WARPS) + (out_lane // 32) * ROWS + (out_lane % 32) // 4
    m0 = tl.program_id(2) * (8 * N_TILES) + 2 * (out_lane % 4)
    out = out_ptr + tl.program_id(1) * stride_os
    for r in tl.static_range(ROW_TILES):
        for j in tl.static_range(N_TILES):
            if r == 0:
                acc = cs[j]
            else:
                acc = ds[j]
            acc = (
                _sum_k_warps(acc[0] + bad, ROW_LANES, K_WARPS),
                _sum_k_warps(acc[1] + bad, ROW_LANES, K_WARPS),
                _sum_k_warps(acc[2] + bad, ROW_LANES, K_WARPS),
                _sum_k_warps(acc[3] + bad, ROW_LANES, K_WARPS),
            )
            _store(out, acc, m0 + 8 * j, r0 + 16 * r, r0 + 16 * r + 8, M, N, stride_om)
