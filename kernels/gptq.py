"""GPTQ's inner loop for one block of columns, fused: for a tile of rows, quantize the block's
columns one after the other, each column's error fed into the columns after it, with the tile
of weights held in registers.

In torch the same loop is about a dozen small kernel launches per column (4096-14336 columns per
layer), which made any4+gptq of Llama-3-8B's shapes take over 6 minutes on an H200; here it is
one launch per block of 128 columns, followed by the block's lazy update of the remaining
columns (a cuBLAS GEMM, in any4ao.codebooks.gptq).

Same arithmetic as the torch loop (any4ao.codebooks.gptq._block_torch), in float32. Codes are
nearest LUT entries as in any4ao.codebooks.kmeans.nearest_code (number of decision boundaries
strictly below the value).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def gptq_block_kernel(
    w_ptr,
    u_ptr,
    lut_ptr,
    s_ptr,
    z_ptr,
    codes_ptr,
    err_ptr,
    N,
    i1,
    ncols,
    group_size,
    stride_w,
    stride_u,
    stride_s,
    stride_codes,
    stride_err,
    C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < ncols
    tile_mask = rmask[:, None] & cmask[None, :]
    tile = tl.load(w_ptr + rows64[:, None] * stride_w + (i1 + cols)[None, :], mask=tile_mask, other=0.0)
    cidx = tl.arange(0, C)
    lut = tl.load(lut_ptr + rows64[:, None] * C + cidx[None, :], mask=rmask[:, None], other=0.0)
    following = tl.load(
        lut_ptr + rows64[:, None] * C + cidx[None, :] + 1, mask=rmask[:, None] & (cidx[None, :] + 1 < C), other=0.0
    )
    # boundary between entries c and c+1; none after the last entry
    boundaries = tl.where(cidx[None, :] + 1 < C, (lut + following) * 0.5, float("inf"))
    codes = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.int32)
    errors = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for j in range(0, ncols):
        this = cols[None, :] == j
        col = tl.sum(tl.where(this, tile, 0.0), axis=1)
        g = (i1 + j) // group_size
        s = tl.load(s_ptr + rows64 * stride_s + g, mask=rmask, other=1.0)
        z = tl.load(z_ptr + rows64 * stride_s + g, mask=rmask, other=0.0)
        x = tl.where(s > 0, (col - z) / tl.where(s > 0, s, 1.0), 0.0)
        code = tl.sum((x[:, None] > boundaries).to(tl.int32), axis=1)
        q = tl.sum(tl.where(code[:, None] == cidx[None, :], lut, 0.0), axis=1) * s + z
        d = tl.load(u_ptr + (i1 + j).to(tl.int64) * stride_u + i1 + j)
        err = (col - q) / d
        u_row = tl.load(u_ptr + (i1 + j).to(tl.int64) * stride_u + i1 + cols, mask=cmask & (cols >= j), other=0.0)
        tile -= err[:, None] * u_row[None, :]
        codes = tl.where(this, code[:, None], codes)
        errors = tl.where(this, err[:, None], errors)
    tl.store(codes_ptr + rows64[:, None] * stride_codes + (i1 + cols)[None, :], codes.to(tl.uint8), mask=tile_mask)
    tl.store(err_ptr + rows64[:, None] * stride_err + cols[None, :], errors, mask=tile_mask)


BLOCK_ROWS = 32


def gptq_block(work, upper, lut, scales, zeros, codes, errors, i1: int, i2: int, group_size: int) -> None:
    """Quantize columns i1..i2 of `work` (N, K) float32 in place of the torch loop: writes
    codes[:, i1:i2] (uint8) and errors[:, :i2-i1] (the scaled errors GPTQ feeds forward).
    upper: (K, K) float32 upper Cholesky factor of the inverse Hessian; lut (N, C), scales and
    zeros (N, ceil(K/G)) float32."""
    n, c = work.shape[0], lut.shape[1]
    ncols = i2 - i1
    block_c = triton.next_power_of_2(max(ncols, 16))
    for t in (work, upper, lut, scales, zeros, errors):
        if t.dtype != torch.float32 or t.stride(-1) != 1:
            raise ValueError("gptq_block takes float32 tensors, contiguous along the last dimension")
    if errors.shape[1] < ncols or codes.dtype != torch.uint8:
        raise ValueError("gptq_block: errors must hold the block's columns, codes must be uint8")
    lut = lut.contiguous()
    gptq_block_kernel[(triton.cdiv(n, BLOCK_ROWS),)](
        work,
        upper,
        lut,
        scales,
        zeros,
        codes,
        errors,
        n,
        i1,
        ncols,
        group_size,
        work.stride(0),
        upper.stride(0),
        scales.stride(0),
        codes.stride(0),
        errors.stride(0),
        C=c,
        BLOCK_N=BLOCK_ROWS,
        BLOCK_C=block_c,
        num_warps=4,
    )
