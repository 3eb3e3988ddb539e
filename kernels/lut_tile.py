"""Reading packed codes and looking them up by load: the dequantize kernel's path for the layouts
the register lookup (lut_permute) does not take.

    W[n, k] = lut[n, code[n, k]] * scale[n, k // GROUP] + zero_point[n, k // GROUP]

Byte j of a row holds the codes of columns PER_BYTE*j + p for p = 0..PER_BYTE-1. A block never
straddles a group (the launcher picks BLOCK_K dividing GROUP), so scale and zero point are loaded
once per block and row.
"""

import triton
import triton.language as tl


@triton.jit
def load_packed(q_ptr, offs_n, k0, N, K, stride_qn, BLOCK_K: tl.constexpr, PER_BYTE: tl.constexpr):
    """(BLOCK_N, BLOCK_K // PER_BYTE) int32 packed bytes of the block starting at column k0."""
    cols = k0 // PER_BYTE + tl.arange(0, BLOCK_K // PER_BYTE)
    mask = (offs_n[:, None] < N) & (cols[None, :] < tl.cdiv(K, PER_BYTE))
    return tl.load(q_ptr + offs_n[:, None] * stride_qn + cols[None, :], mask=mask, other=0).to(tl.int32)


@triton.jit
def lut_lookup(lut_ptr, offs_n, code, N, LUT_SIZE: tl.constexpr):
    """lut[n, code] as float32, a gather load per element (the LUT stays resident in L1). For the
    layouts the register lookup (lut_permute) does not take: 2-bit codes, fp32 LUTs, K % 8 != 0."""
    ptrs = lut_ptr + offs_n[:, None] * LUT_SIZE + code
    return tl.load(ptrs, mask=(offs_n < N)[:, None], other=0.0).to(tl.float32)


@triton.jit
def phase_codes(packed, p: tl.constexpr, NBITS: tl.constexpr):
    SLOT: tl.constexpr = 2 if NBITS == 2 else 4  # 3-bit codes are stored in nibbles
    return (packed >> (p * SLOT)) & ((1 << SLOT) - 1)


@triton.jit
def group_scale_zero(s_ptr, z_ptr, offs_n, k0, N, stride_sn, GROUP: tl.constexpr):
    """(BLOCK_N,) float32 scale and zero of the group holding columns k0 .. k0 + BLOCK_K - 1."""
    nmask = offs_n < N
    scale = tl.load(s_ptr + offs_n * stride_sn + k0 // GROUP, mask=nmask, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + offs_n * stride_sn + k0 // GROUP, mask=nmask, other=0.0).to(tl.float32)
    return scale, zero


@triton.jit
def interleaved_codes(packed, NBITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_N, BLOCK_K) codes in column order, for kernels that store a contiguous tile (the
    dequantize kernel: contiguous stores matter more there than the shuffle this costs)."""
    if NBITS == 2:
        # join(join(c0, c2), join(c1, c3)) flattens to c0, c1, c2, c3
        first = tl.join(phase_codes(packed, 0, NBITS), phase_codes(packed, 2, NBITS))
        second = tl.join(phase_codes(packed, 1, NBITS), phase_codes(packed, 3, NBITS))
        return tl.reshape(tl.join(first, second), (BLOCK_N, BLOCK_K))
    else:
        return tl.reshape(tl.join(phase_codes(packed, 0, NBITS), phase_codes(packed, 1, NBITS)), (BLOCK_N, BLOCK_K))
