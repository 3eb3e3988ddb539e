"""Warp-specialised fused LUT GEMM for Hopper (sm_90a), in Gluon: out = x @ W^T for prefill-sized M.

Why: the tl kernel (lut_gemm) runs its lookup and its wgmma in the same warps, and triton 3.6 puts
a wait for the wgmma and CTA barriers into every K step; ncu at M = 512 (sweep-gemm-NOTE.md) had it
stalled on those barriers, tensor pipe 38-45 % busy. Here each job has its own warps and they hand
tiles over through rings of STAGES shared-memory buffers guarded by mbarriers:

  loader (1 warp)    TMA copies of the x tile (BLOCK_M, BLOCK_K) and of the packed code tile
                     (BLOCK_N, BLOCK_K / 2 bytes) into ring slot i % STAGES
  lookup (4/8 warps) the byte-permute lookup of lut_permute (one row per thread, its LUT in eight
                     byte-plane registers), one fma.rn.bf16x2 (f16x2) per pair of weights for the
                     group's scale and zero, the W tile (BLOCK_N, BLOCK_K) stored to its slot
  mma (default)      wgmma acc[n, m] += W_tile @ x_tile^T, one step in flight; then the epilogue

Barriers per slot: load_ready (TMA bytes landed), load_empty (count 2: lookup has read the codes and
the mma has read x), w_ready (W tile stored), w_empty (the mma that read it is done). The 16-bit
pairs are stored as uint32 through a reinterpreted view of the W buffer: 128-byte rows in the same
128-byte swizzle, so the bytes land where the bf16 view expects them.

Takes: 4-bit codes, x / LUT / scale / zero of one 16-bit dtype, K % (BLOCK_K * SPLIT_K) == 0, the group
a multiple of BLOCK_K, BLOCK_K = 64 (one 128-byte swizzled row per W row). Hopper only: no interpreter path
(the tests run it where a GPU is present; benchmarks/check_ws_gemm.py checks it against float64).

Status: checked against float64 and timed on an H100 (sweep-gemm-NOTE.md, seventh round; 8 lookup
warps only compiled, not yet run). Routed nowhere (selector.WS_RULES is empty): it beat today's path
only at some M of 128-512 and lost from M = 768 on.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

CODE_SWIZZLE = gl.constexpr(32)  # bytes: a code tile's rows are BLOCK_K / 2 = 32 bytes
# registers a lookup thread asks for, by lookup warps: with 8 the CTA has 16 warps, 128 registers a thread
LOOKUP_REGISTERS = {4: 152, 8: 96}


def tile_layouts():
    """The shared layouts TMA writes the x tile (bf16 / fp16 rows of 128 bytes) and the code tile
    in; the kernel reads the code tile through a 32-bit view of the same swizzle."""
    return (
        gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2),
        gl.NVMMASharedLayout(swizzle_byte_width=CODE_SWIZZLE.value, element_bitwidth=8, rank=2),
    )


@gluon.jit
def _prmt(a, b, sel):
    """PTX prmt.b32: byte i of the result is byte (sel >> 4i) & 7 of b:a (lut_permute.prmt)."""
    return gl.inline_asm_elementwise(
        "prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel], dtype=gl.uint32, is_pure=True, pack=1
    )


@gluon.jit
def _pair_fma(pair, s2, z2, FP16: gl.constexpr):
    """pair * s2 + z2 on both 16-bit halves, rounded once."""
    if FP16:
        asm: gl.constexpr = "fma.rn.f16x2 $0, $1, $2, $3;"
    else:
        asm: gl.constexpr = "fma.rn.bf16x2 $0, $1, $2, $3;"
    return gl.inline_asm_elementwise(asm, "=r,r,r,r", [pair, s2, z2], dtype=gl.uint32, is_pure=True, pack=1)


@gluon.jit
def _byte_planes(lutw_ptr, rows, nmask):
    """The 8 byte-plane registers (L0..L3, H0..H3) of each row's 16-entry LUT (lut_permute.lut_byte_planes)."""
    base = lutw_ptr + rows * 8
    w0 = gl.load(base + 0, mask=nmask, other=0).to(gl.uint32, bitcast=True)
    w1 = gl.load(base + 1, mask=nmask, other=0).to(gl.uint32, bitcast=True)
    w2 = gl.load(base + 2, mask=nmask, other=0).to(gl.uint32, bitcast=True)
    w3 = gl.load(base + 3, mask=nmask, other=0).to(gl.uint32, bitcast=True)
    w4 = gl.load(base + 4, mask=nmask, other=0).to(gl.uint32, bitcast=True)
    w5 = gl.load(base + 5, mask=nmask, other=0).to(gl.uint32, bitcast=True)
    w6 = gl.load(base + 6, mask=nmask, other=0).to(gl.uint32, bitcast=True)
    w7 = gl.load(base + 7, mask=nmask, other=0).to(gl.uint32, bitcast=True)
    lows = gl.full_like(w0, 0x6420)
    highs = gl.full_like(w0, 0x7531)
    return (
        _prmt(w0, w1, lows),
        _prmt(w2, w3, lows),
        _prmt(w4, w5, lows),
        _prmt(w6, w7, lows),
        _prmt(w0, w1, highs),
        _prmt(w2, w3, highs),
        _prmt(w4, w5, highs),
        _prmt(w6, w7, highs),
    )


@gluon.jit
def _lookup_pairs(word, P0, P1, P2, P3, P4, P5, P6, P7):
    """8 codes per uint32 word (nibble i = column i) -> 4 uint32 pairs of 16-bit LUT values, columns
    (0, 1), (2, 3), (4, 5), (6, 7) (lut_permute.lookup8 for 16-entry LUTs)."""
    low3 = word & 0x77777777
    low3_hi = low3 >> 16
    by_bit3 = ((word >> 1) & 0x44444444) | 0x32103210
    by_bit3_hi = by_bit3 >> 16
    lo_a = _prmt(_prmt(P0, P1, low3), _prmt(P2, P3, low3), by_bit3)
    hi_a = _prmt(_prmt(P4, P5, low3), _prmt(P6, P7, low3), by_bit3)
    lo_b = _prmt(_prmt(P0, P1, low3_hi), _prmt(P2, P3, low3_hi), by_bit3_hi)
    hi_b = _prmt(_prmt(P4, P5, low3_hi), _prmt(P6, P7, low3_hi), by_bit3_hi)
    first = gl.full_like(lo_a, 0x5140)
    second = gl.full_like(lo_a, 0x7362)
    return _prmt(lo_a, hi_a, first), _prmt(lo_a, hi_a, second), _prmt(lo_b, hi_b, first), _prmt(lo_b, hi_b, second)


@gluon.jit
def _loader(x_desc, q_desc, x_bufs, q_bufs, load_ready, load_empty, step0, steps, off_m, off_n, BLOCK_K: gl.constexpr):
    STAGES: gl.constexpr = x_bufs.shape[0]
    for i in range(steps):
        slot = i % STAGES
        phase = (i // STAGES) & 1
        mbarrier.wait(load_empty.index(slot), phase ^ 1)  # a fresh barrier passes parity 1
        bar = load_ready.index(slot)
        mbarrier.expect(bar, x_desc.block_type.nbytes + q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(x_desc, [off_m, (step0 + i) * BLOCK_K], bar, x_bufs.index(slot))
        tma.async_copy_global_to_shared(q_desc, [off_n, (step0 + i) * (BLOCK_K // 2)], bar, q_bufs.index(slot))


@gluon.jit
def _lookup(
    q_words,
    w_pairs,
    load_ready,
    load_empty,
    w_ready,
    w_empty,
    lutw_ptr,
    s_ptr,
    z_ptr,
    N,
    stride_sn,
    step0,
    steps,
    off_n,
    GROUP: gl.constexpr,
    BLOCK_K: gl.constexpr,
    FP16: gl.constexpr,
    WARPS: gl.constexpr,
):
    STAGES: gl.constexpr = q_words.shape[0]
    BLOCK_N: gl.constexpr = q_words.shape[1]
    WORDS: gl.constexpr = BLOCK_K // 8
    TPR: gl.constexpr = WARPS * 32 // BLOCK_N  # threads per row
    layout: gl.constexpr = gl.BlockedLayout([1, WORDS // TPR], [32 // TPR, TPR], [WARPS, 1], [1, 0])
    rows = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
    nmask = rows < N
    P0, P1, P2, P3, P4, P5, P6, P7 = _byte_planes(lutw_ptr, rows, nmask)
    P0, P1, P2, P3 = gl.expand_dims(P0, 1), gl.expand_dims(P1, 1), gl.expand_dims(P2, 1), gl.expand_dims(P3, 1)
    P4, P5, P6, P7 = gl.expand_dims(P4, 1), gl.expand_dims(P5, 1), gl.expand_dims(P6, 1), gl.expand_dims(P7, 1)
    s_rows = s_ptr + rows * stride_sn
    z_rows = z_ptr + rows * stride_sn
    for i in range(steps):
        slot = i % STAGES
        phase = (i // STAGES) & 1
        g = ((step0 + i) * BLOCK_K) // GROUP
        s = gl.load(s_rows + g, mask=nmask, other=0.0).to(gl.uint16, bitcast=True).to(gl.uint32) * 65537
        z = gl.load(z_rows + g, mask=nmask, other=0.0).to(gl.uint16, bitcast=True).to(gl.uint32) * 65537
        mbarrier.wait(load_ready.index(slot), phase)
        words = q_words.index(slot).load(layout)
        fence_async_shared()  # this generic-proxy read before the loader's next TMA write to the slot
        mbarrier.arrive(load_empty.index(slot), count=1)
        p01, p23, p45, p67 = _lookup_pairs(words, P0, P1, P2, P3, P4, P5, P6, P7)
        s2 = gl.expand_dims(s, 1)
        z2 = gl.expand_dims(z, 1)
        p01 = _pair_fma(p01, s2, z2, FP16)
        p23 = _pair_fma(p23, s2, z2, FP16)
        p45 = _pair_fma(p45, s2, z2, FP16)
        p67 = _pair_fma(p67, s2, z2, FP16)
        # (BLOCK_N, WORDS, 2, 2) -> pair 4w + 2b + a: join on the slower index first
        tile = gl.reshape(gl.join(gl.join(p01, p45), gl.join(p23, p67)), [BLOCK_N, BLOCK_K // 2])
        mbarrier.wait(w_empty.index(slot), phase ^ 1)
        w_pairs.index(slot).store(tile)
        fence_async_shared()  # generic-proxy stores before the wgmma (async proxy) reads them
        mbarrier.arrive(w_ready.index(slot), count=1)


@gluon.jit
def _mma(
    w_bufs,
    x_bufs,
    load_ready,
    load_empty,
    w_ready,
    w_empty,
    out_ptr,
    M,
    N,
    stride_om,
    steps,
    off_m,
    off_n,
    num_warps: gl.constexpr,
):
    STAGES: gl.constexpr = w_bufs.shape[0]
    BLOCK_N: gl.constexpr = w_bufs.shape[1]
    BLOCK_M: gl.constexpr = x_bufs.shape[1]
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_M, 16]
    )
    acc = gl.zeros((BLOCK_N, BLOCK_M), dtype=gl.float32, layout=acc_layout)
    for i in range(steps):
        slot = i % STAGES
        phase = (i // STAGES) & 1
        mbarrier.wait(w_ready.index(slot), phase)
        mbarrier.wait(load_ready.index(slot), phase)
        acc = warpgroup_mma(w_bufs.index(slot), x_bufs.index(slot).permute((1, 0)), acc, is_async=True)
        # the step before this one has finished: its W and x slots go back to the producers
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        prev = (i + STAGES - 1) % STAGES
        mbarrier.arrive(w_empty.index(prev), count=1, pred=i > 0)
        mbarrier.arrive(load_empty.index(prev), count=1, pred=i > 0)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    # out[m, n] = acc[n, m]: n is the contiguous index of out, so lay n along threads for the store
    store_layout: gl.constexpr = gl.BlockedLayout([8, 1], [16, 2], [1, num_warps], [0, 1])
    res = gl.convert_layout(acc.to(out_ptr.dtype.element_ty), store_layout)
    offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, store_layout))
    offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, store_layout))
    ptrs = out_ptr + gl.expand_dims(offs_m, 0) * stride_om + gl.expand_dims(offs_n, 1)
    mask = (gl.expand_dims(offs_m, 0) < M) & (gl.expand_dims(offs_n, 1) < N)
    gl.store(ptrs, res, mask=mask)


@gluon.jit
def lut_gemm_ws_kernel(
    x_desc,
    q_desc,
    lutw_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_sn,
    stride_om,
    stride_os,
    GROUP: gl.constexpr,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
    SPLIT_K: gl.constexpr,
    FP16: gl.constexpr,
    LOOKUP_REGS: gl.constexpr,
    LOOKUP_WARPS: gl.constexpr,
    num_warps: gl.constexpr,
):
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    # programs that share a W tile run side by side (M tiles fastest): its codes come from L2
    tiles_m = gl.cdiv(M, BLOCK_M)
    pid = gl.program_id(0)
    off_m = (pid % tiles_m) * BLOCK_M
    off_n = (pid // tiles_m) * BLOCK_N
    # split K: program (pid, s) sums K steps s * steps .. (s + 1) * steps - 1 into its own float32
    # slice of out (SPLIT_K, M, N), for grids too small to fill the GPU; the launcher adds the slices
    steps = K // BLOCK_K // SPLIT_K
    step0 = gl.program_id(1) * steps
    out_ptr = out_ptr + gl.program_id(1) * stride_os

    x_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    q_bufs = gl.allocate_shared_memory(q_desc.dtype, [STAGES, BLOCK_N, BLOCK_K // 2], q_desc.layout)
    w_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    w_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], w_layout)
    # the same bytes as 32-bit pairs (same rows of 128 bytes, same swizzle) and the codes as words
    pair_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
    w_pairs = w_bufs._reinterpret(gl.uint32, [STAGES, BLOCK_N, BLOCK_K // 2], pair_layout)
    word_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=CODE_SWIZZLE, element_bitwidth=32, rank=2)
    q_words = q_bufs._reinterpret(gl.uint32, [STAGES, BLOCK_N, BLOCK_K // 8], word_layout)

    load_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    load_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    w_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    w_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(load_ready.index(i), count=1)
        mbarrier.init(load_empty.index(i), count=2)
        mbarrier.init(w_ready.index(i), count=1)
        mbarrier.init(w_empty.index(i), count=1)

    gl.warp_specialize(
        [
            (
                _mma,
                (
                    w_bufs,
                    x_bufs,
                    load_ready,
                    load_empty,
                    w_ready,
                    w_empty,
                    out_ptr,
                    M,
                    N,
                    stride_om,
                    steps,
                    off_m,
                    off_n,
                    num_warps,
                ),
            ),
            (
                _lookup,
                (
                    q_words,
                    w_pairs,
                    load_ready,
                    load_empty,
                    w_ready,
                    w_empty,
                    lutw_ptr,
                    s_ptr,
                    z_ptr,
                    N,
                    stride_sn,
                    step0,
                    steps,
                    off_n,
                    GROUP,
                    BLOCK_K,
                    FP16,
                    LOOKUP_WARPS,
                ),
            ),
            (_loader, (x_desc, q_desc, x_bufs, q_bufs, load_ready, load_empty, step0, steps, off_m, off_n, BLOCK_K)),
        ],
        [LOOKUP_WARPS, 1],
        [LOOKUP_REGS, 24],
    )
