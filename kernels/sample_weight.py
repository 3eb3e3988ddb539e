"""k-means sample weights of one chunk of rows, fused: per row r and input channel k

    sw[r, k] = (s[r, g(k)] / max_g s[r, g])^2 * h[k],   then divided by the row's max sw

in float64 and rounded once to float32, with positive weights kept at or above a floor (so that
none is a float32 denormal); the reasons are in any4ao.codebooks.quantize._sample_weight, whose
torch version this is, operation for operation (same float64 divisions, products and rounding:
the results are equal bit for bit). In torch it is seven passes over a float64 (R, K) chunk;
any4 quantization takes it once per start and per refit round. Here a program owns one row and
reads each scale and h twice (row maximum, then the weights) and writes float32 once.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def sample_weight_kernel(
    s_ptr, h_ptr, out_ptr, K, G, stride_s, stride_h, stride_out, GROUP: tl.constexpr, FLOOR: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    smax = tl.zeros((BLOCK_G,), dtype=tl.float64)
    for g0 in range(0, G, BLOCK_G):
        offs = g0 + tl.arange(0, BLOCK_G)
        s = tl.load(s_ptr + row * stride_s + offs, mask=offs < G, other=0.0).to(tl.float64)
        smax = tl.maximum(smax, s)
    top_s = tl.max(smax, axis=0)
    top_s = tl.where(top_s > 0, top_s, 1.0)
    top = tl.zeros((BLOCK_K,), dtype=tl.float64)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        inside = offs < K
        s = tl.load(s_ptr + row * stride_s + offs // GROUP, mask=inside, other=0.0).to(tl.float64) / top_s
        h = tl.load(h_ptr + row * stride_h + offs, mask=inside, other=0.0).to(tl.float64)
        top = tl.maximum(top, (s * s) * h)
    row_top = tl.max(top, axis=0)
    row_top = tl.where(row_top > 0, row_top, 1.0)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        inside = offs < K
        s = tl.load(s_ptr + row * stride_s + offs // GROUP, mask=inside, other=0.0).to(tl.float64) / top_s
        h = tl.load(h_ptr + row * stride_h + offs, mask=inside, other=0.0).to(tl.float64)
        sw = ((s * s) * h / row_top).to(tl.float32)
        sw = tl.where(sw > 0, tl.maximum(sw, FLOOR), sw)
        tl.store(out_ptr + row * stride_out + offs, sw, mask=inside)


def sample_weight(scales: torch.Tensor, h: torch.Tensor, k: int, group_size: int, floor: float, out=None):
    """(R, K) float32 sample weights (module docstring). scales: (R, ceil(K / G)) non-negative;
    h: (1, K) or (R, K) non-negative; floor: the smallest positive weight kept."""
    r, g = scales.shape
    if g != -(-k // group_size) or h.shape[-1] != k or h.shape[0] not in (1, r):
        raise ValueError(f"sample_weight: scales {tuple(scales.shape)}, h {tuple(h.shape)}, K={k}, group {group_size}")
    shared = h.shape[0] == 1 or h.stride(0) == 0
    h = h[:1].contiguous() if shared else h.contiguous()
    scales = scales.contiguous()
    if out is None:
        out = scales.new_empty(r, k, dtype=torch.float32)
    if r:
        sample_weight_kernel[(r,)](
            scales, h, out, k, g, scales.stride(0), 0 if shared else h.stride(0), out.stride(0),
            GROUP=group_size, FLOOR=floor, BLOCK_K=min(512, max(16, triton.next_power_of_2(k))),
            BLOCK_G=min(128, max(16, triton.next_power_of_2(g))), num_warps=4,
        )  # fmt: skip
    return out
