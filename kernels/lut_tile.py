"""Pieces every kernel shares: reading packed codes and looking them up in the per-row LUT.

    W[n, k] = lut[n, code[n, k]] * scales[n, k // GROUP] + zeros[n, k // GROUP]

Layout trick: byte j of a row holds the codes of columns PER_BYTE*j + p for p = 0..PER_BYTE-1.
Kernels never interleave those back into a contiguous tile (a register shuffle that cost more
than the math): they load the packed (BLOCK_N, BLOCK_K / PER_BYTE) bytes once, and for each
phase p multiply the looked-up LUT values with the matching strided columns of x.
A K block never straddles a group (the launcher picks BLOCK_K dividing GROUP), so scale and zero
are applied once per block and row:  sum_k x_k W[n,k] = s[n] * sum_k x_k lut[n, c_k] + z[n] * sum_k x_k.
"""

import triton
import triton.language as tl


@triton.jit
def split_k_range(pid_k, K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """[k_begin, k_end) of this K split: whole BLOCK_K blocks, so blocks never straddle a group."""
    blocks_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_begin = pid_k * blocks_per_split * BLOCK_K
    return k_begin, tl.minimum(k_begin + blocks_per_split * BLOCK_K, K)


@triton.jit
def load_x_phase(x_ptr, offs_m, k0, offs_j, p: tl.constexpr, M, K, stride_xm, PER_BYTE: tl.constexpr):
    """Columns k0 + PER_BYTE*j + p of x: the activations that meet byte phase p of the codes."""
    cols = k0 + offs_j * PER_BYTE + p
    return tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :],
                   mask=(offs_m[:, None] < M) & (cols[None, :] < K), other=0.0)


@triton.jit
def load_packed(q_ptr, offs_n, k0, N, K, stride_qn, BLOCK_K: tl.constexpr, PER_BYTE: tl.constexpr):
    """(BLOCK_N, BLOCK_K // PER_BYTE) int32 packed bytes of the block starting at column k0."""
    cols = k0 // PER_BYTE + tl.arange(0, BLOCK_K // PER_BYTE)
    mask = (offs_n[:, None] < N) & (cols[None, :] < tl.cdiv(K, PER_BYTE))
    return tl.load(q_ptr + offs_n[:, None] * stride_qn + cols[None, :], mask=mask, other=0).to(tl.int32)


LUT_LOAD, LUT_SELECT, LUT_REGISTER = 0, 1, 2  # LUT_MODE values


@triton.jit
def lut_lookup(lut_ptr, offs_n, code, N, LUT_SIZE: tl.constexpr, LUT_MODE: tl.constexpr):
    """lut[n, code] as float32, three ways:
    LUT_LOAD      a gather load per element (the LUT stays resident in L1);
    LUT_SELECT    a select tree over the row's values held in registers (no loads, more ALU);
    LUT_REGISTER  tl.gather from a (BLOCK_N, LUT_SIZE) register tile (warp shuffles when the
                  compiler keeps a row's LUT inside one warp, shared memory otherwise)."""
    nmask = offs_n < N
    if LUT_MODE == 1:
        row = lut_ptr + offs_n * LUT_SIZE
        out = tl.zeros(code.shape, dtype=tl.float32)
        for j in tl.static_range(LUT_SIZE):
            v = tl.load(row + j, mask=nmask, other=0.0).to(tl.float32)
            out = tl.where(code == j, v[:, None], out)
        return out
    elif LUT_MODE == 2:
        entries = tl.arange(0, LUT_SIZE)
        table = tl.load(lut_ptr + offs_n[:, None] * LUT_SIZE + entries[None, :], mask=nmask[:, None], other=0.0)
        return tl.gather(table.to(tl.float32), code, 1)
    else:
        ptrs = lut_ptr + offs_n[:, None] * LUT_SIZE + code
        return tl.load(ptrs, mask=nmask[:, None], other=0.0).to(tl.float32)


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
