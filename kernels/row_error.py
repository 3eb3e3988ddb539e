"""Per-row weighted squared error of a quantized matrix, fused: the objective k-means and the
scale refit compare candidates by, per row r,

    affine:  sum_k h[r, k] * (w[r, k] - (lut[r, code[r, k]] * s[r, k // G] + z[r, k // G]))^2
    plain:   sum_k h[r, k] * (x[r, k] - lut[r, code[r, k]])^2        (x, lut in the code domain)

accumulated in float64. In torch each is a gather, three or four float64 casts of the whole
(R, K) chunk and as many elementwise passes through memory; any4 quantization evaluates it about
a dozen times per chunk (every start, every refit round, the rounding guards), which made these
passes most of the non-k-means time in the quantize profile (benchmarks/results/). Here a program
owns one row and reads w, h and the codes once.

Same arithmetic as the torch versions (any4ao.codebooks.kmeans.weighted_sse,
any4ao.codebooks.refine.real_domain_error): the plain difference is taken in float32, as the
torch one is, everything else in float64; only the summation order (and the compiler's
multiply-add contraction of the affine map) differ.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def row_error_kernel(
    w_ptr,
    h_ptr,
    codes_ptr,
    lut_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    K,
    stride_w,
    stride_h,
    stride_codes,
    stride_lut,
    stride_s,
    GROUP: tl.constexpr,
    AFFINE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float64)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        inside = offs < K
        w = tl.load(w_ptr + row * stride_w + offs, mask=inside, other=0.0)
        h = tl.load(h_ptr + row * stride_h + offs, mask=inside, other=0.0).to(tl.float64)  # padding weighs 0
        code = tl.load(codes_ptr + row * stride_codes + offs, mask=inside, other=0).to(tl.int32)
        v = tl.load(lut_ptr + row * stride_lut + code, mask=inside, other=0.0)
        if AFFINE:
            s = tl.load(s_ptr + row * stride_s + offs // GROUP, mask=inside, other=0.0).to(tl.float64)
            z = tl.load(z_ptr + row * stride_s + offs // GROUP, mask=inside, other=0.0).to(tl.float64)
            d = w.to(tl.float64) - (v.to(tl.float64) * s + z)
        else:
            d = (w - v).to(tl.float64)
        acc += h * (d * d)
    tl.store(out_ptr + row, tl.sum(acc, axis=0))


def row_error(w, weight, lut, codes, scales=None, zeros=None, group_size: int = 0, out=None) -> torch.Tensor:
    """(R,) float64 per-row error (module docstring): affine when scales and zeros are given.
    w: (R, K) float32; weight: (R, K) or (1, K), any float dtype; lut: (R, C) float32; codes: (R, K)
    integer; scales, zeros: (R, ceil(K / G)) float32. `out`: a preallocated (R,) float64 output."""
    r, k = w.shape
    affine = scales is not None
    if w.dtype != torch.float32 or lut.dtype != torch.float32 or (affine and scales.dtype != torch.float32):
        raise ValueError("row_error takes float32 w, lut, scales and zeros")
    if codes.shape != w.shape or lut.shape[0] != r or weight.shape[-1] != k or weight.shape[0] not in (1, r):
        raise ValueError(f"row_error: w {tuple(w.shape)}, weight {tuple(weight.shape)}, codes {tuple(codes.shape)}")
    if affine and (group_size <= 0 or scales.shape != zeros.shape or scales.shape != (r, -(-k // group_size))):
        raise ValueError(f"row_error: scales {tuple(scales.shape)} do not fit K={k}, group {group_size}")
    w, codes, lut = w.contiguous(), codes.contiguous(), lut.contiguous()
    # one row of weights serves every row (also an expanded (1, K) view: never materialised)
    shared = weight.shape[0] == 1 or weight.stride(0) == 0
    weight = weight[:1].contiguous() if shared else weight.contiguous()
    if affine:
        scales, zeros = scales.contiguous(), zeros.contiguous()
    if out is None:
        out = w.new_empty(r, dtype=torch.float64)
    if r:
        row_error_kernel[(r,)](
            w,
            weight,
            codes,
            lut,
            scales if affine else w,
            zeros if affine else w,
            out,
            k,
            w.stride(0),
            0 if shared else weight.stride(0),
            codes.stride(0),
            lut.stride(0),
            scales.stride(0) if affine else 0,
            GROUP=group_size if affine else 1,
            AFFINE=affine,
            BLOCK_K=min(512, max(16, triton.next_power_of_2(k))),
            num_warps=4,
        )
    return out
