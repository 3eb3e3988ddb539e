"""The piece every kernel shares: dequantize a (BLOCK_N, BLOCK_K) tile of an Any4Tensor in registers.

    W[n, k] = lut[n, code[n, k]] * scales[n, k // GROUP] + zeros[n, k // GROUP]

Codes are read straight from the packed bytes (two 4-bit or 3-bit codes per byte, four 2-bit);
the LUT, scales and zeros are tiny per row and stay in L1/L2, so the tile costs one pass over the
packed codes. Masked elements come back as 0.
"""

import triton
import triton.language as tl


@triton.jit
def dequant_tile(
    q_ptr, lut_ptr, s_ptr, z_ptr,
    offs_n, offs_k, N, K,
    stride_qn, stride_sn,
    NBITS: tl.constexpr, GROUP: tl.constexpr,
):
    SLOT_BITS: tl.constexpr = 2 if NBITS == 2 else 4  # 3-bit codes are stored in nibbles
    PER_BYTE: tl.constexpr = 8 // SLOT_BITS
    LUT_SIZE: tl.constexpr = 1 << NBITS
    n = offs_n[:, None]
    k = offs_k[None, :]
    mask = (n < N) & (k < K)
    byte = tl.load(q_ptr + n * stride_qn + k // PER_BYTE, mask=mask, other=0)
    shift = ((k % PER_BYTE) * SLOT_BITS).to(tl.uint8)
    code = ((byte >> shift) & ((1 << SLOT_BITS) - 1)).to(tl.int32)
    value = tl.load(lut_ptr + n * LUT_SIZE + code, mask=mask, other=0.0).to(tl.float32)
    group = k // GROUP
    scale = tl.load(s_ptr + n * stride_sn + group, mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + n * stride_sn + group, mask=mask, other=0.0).to(tl.float32)
    return value * scale + zero
