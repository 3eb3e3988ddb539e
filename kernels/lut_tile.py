"""The piece every kernel shares: dequantize a (BLOCK_N, BLOCK_K) tile of an Any4Tensor in registers.

    W[n, k] = lut[n, code[n, k]] * scales[n, k // GROUP] + zeros[n, k // GROUP]

Cost model: the weight stream is the packed bytes, read once as a coalesced (BLOCK_N, BLOCK_K /
codes_per_byte) tile and split into codes in registers. A K block never straddles a group
(the launcher picks BLOCK_K dividing GROUP), so scale and zero are one (BLOCK_N,) vector per block.
The LUT lookup has two forms (LUT_SELECT):
  False: a gather load lut[n, code] (the LUT is N x 16 values, resident in L1/L2);
  True:  a binary select tree over the row's 2**NBITS values held in registers (no loads, more ALU).
`k0` is the block's first column; masked elements come back as 0.
"""

import triton
import triton.language as tl


@triton.jit
def _codes(q_ptr, offs_n, k0, N, K, stride_qn, BLOCK_K: tl.constexpr, NBITS: tl.constexpr):
    """(BLOCK_N, BLOCK_K) int32 codes from one coalesced load of packed bytes."""
    if NBITS == 2:
        cols = k0 // 4 + tl.arange(0, BLOCK_K // 4)
        mask = (offs_n[:, None] < N) & (cols[None, :] < tl.cdiv(K, 4))
        b = tl.load(q_ptr + offs_n[:, None] * stride_qn + cols[None, :], mask=mask, other=0).to(tl.int32)
        # join(join(c0, c2), join(c1, c3)) flattens to c0, c1, c2, c3: column 4j+i is bits 2i..2i+1
        pair_a = tl.join(b & 3, (b >> 4) & 3)
        pair_b = tl.join((b >> 2) & 3, (b >> 6) & 3)
        return tl.reshape(tl.join(pair_a, pair_b), (offs_n.shape[0], BLOCK_K))
    else:
        cols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        mask = (offs_n[:, None] < N) & (cols[None, :] < tl.cdiv(K, 2))
        b = tl.load(q_ptr + offs_n[:, None] * stride_qn + cols[None, :], mask=mask, other=0).to(tl.int32)
        # low nibble = even column, high nibble = odd column
        return tl.reshape(tl.join(b & 15, b >> 4), (offs_n.shape[0], BLOCK_K))


@triton.jit
def _select(lut_ptr, offs_n, code, N, LUT_SIZE: tl.constexpr):
    """lut[n, code] by a select tree over the row's values (loaded once per tile as vectors)."""
    row = lut_ptr + offs_n * LUT_SIZE
    nmask = offs_n < N
    out = tl.zeros(code.shape, dtype=tl.float32)
    for j in tl.static_range(LUT_SIZE):
        v = tl.load(row + j, mask=nmask, other=0.0).to(tl.float32)
        out = tl.where(code == j, v[:, None], out)
    return out


@triton.jit
def dequant_tile(
    q_ptr, lut_ptr, s_ptr, z_ptr,
    offs_n, k0, N, K,
    stride_qn, stride_sn,
    NBITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, LUT_SELECT: tl.constexpr,
):
    LUT_SIZE: tl.constexpr = 1 << NBITS
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    code = _codes(q_ptr, offs_n, k0, N, K, stride_qn, BLOCK_K, NBITS)
    if LUT_SELECT:
        value = _select(lut_ptr, offs_n, code, N, LUT_SIZE)
    else:
        value = tl.load(lut_ptr + offs_n[:, None] * LUT_SIZE + code, mask=mask, other=0.0).to(tl.float32)
    nmask = offs_n < N
    scale = tl.load(s_ptr + offs_n * stride_sn + k0 // GROUP, mask=nmask, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + offs_n * stride_sn + k0 // GROUP, mask=nmask, other=0.0).to(tl.float32)
    return tl.where(mask, value * scale[:, None] + zero[:, None], 0.0)
