"""Quantize one weight matrix into (codes, per-row LUT, per-group scales and zeros).

W[n, k] ~= lut[n, code[n, k]] * scales[n, k // G] + zeros[n, k // G]

Codebooks:
  "any"  learned per-row LUT: int-style min/max group scaling, then weighted k-means per row
         (the any4 paper's method; nbits 2, 3 or 4 give any2/any3/any4)
  "int"  the uniform grid 0..2**nbits-1 with the same min/max scaling (int4 when nbits=4)
  "nf4"  QLoRA normal-float values with absmax scaling
  "fp4"  e2m1 values with absmax scaling
"""

from dataclasses import dataclass
from typing import Optional

import torch

from any4ao.codebooks.fixed import FP4_E2M1_MAGNITUDES, fixed_lut, int_grid
from any4ao.codebooks.group_scaling import absmax_params, expand_groups, minmax_params, to_code_domain
from any4ao.codebooks.kmeans import lloyd_max, nearest_code, weighted_sse
from any4ao.codebooks.refine import fit_group_affine, real_domain_error
from any4ao.config import Any4WeightOnlyConfig, Scaling
from any4ao.validation import dequant_range_ok

CODEBOOKS = ("any", "int", "nf4", "fp4")
# Rows are processed in chunks of about this many elements, bounding k-means' working memory
# (a handful of float32 temporaries of this size) independently of the layer's size.
CHUNK_ELEMENTS = 1 << 22
# Positive k-means sample weights are kept at or above this (they are normalised to a row maximum of
# 1 first), so that no positive weight is a float32 denormal, whose products with x lose their bits.
MIN_SAMPLE_WEIGHT = 1e-24


@dataclass
class QuantizedWeight:
    codes: torch.Tensor  # (N, K) uint8, unpacked
    lut: torch.Tensor  # (N, 2**nbits), storage dtype, sorted per row
    scale: torch.Tensor  # (N, ceil(K/G)), storage dtype
    zero_point: torch.Tensor  # (N, ceil(K/G)), storage dtype


def _row_chunks(num_rows: int, in_features: int):
    step = max(1, CHUNK_ELEMENTS // max(1, in_features))
    for start in range(0, num_rows, step):
        yield slice(start, min(num_rows, start + step))


def _sample_weight(scales: torch.Tensor, h: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """k-means sample weights h_k * scale_g(k)^2, normalised per row before squaring and again after
    (in float64): scale^2 of weights near 1e30 overflows float32 and of weights near 1e-30 (or fp32
    denormals) underflows to 0, which left k-means with Inf/NaN or all-zero weights. A per-row
    constant does not change the row's k-means solution."""
    s = scales.double()
    smax = s.amax(1, keepdim=True)
    s = s / torch.where(smax > 0, smax, torch.ones_like(smax))
    sw = expand_groups(s, k, group_size).square() * h
    top = sw.amax(1, keepdim=True)
    sw = (sw / torch.where(top > 0, top, torch.ones_like(top))).float()
    return torch.where(sw > 0, sw.clamp_min(MIN_SAMPLE_WEIGHT), sw)


def _learn_lut(x, sample_weight, grid, iterations, dtype):
    """k-means from the int grid, LUT rounded to the storage dtype, then a per-row guard:
    where rounding made a row worse than the grid itself, that row keeps the grid. So the learned
    codebook's weighted error is never above int's, even after rounding."""
    if iterations > 0:
        centroids = lloyd_max(x, sample_weight, grid, iterations).centroids
    else:
        centroids = grid.expand(x.shape[0], -1)
    lut = centroids.to(dtype).float()
    codes = nearest_code(x, lut)
    grid_rows = grid.expand_as(lut).contiguous()
    grid_codes = nearest_code(x, grid_rows)
    worse = weighted_sse(x, sample_weight, lut, codes) > weighted_sse(x, sample_weight, grid_rows, grid_codes)
    lut = torch.where(worse[:, None], grid_rows, lut)
    codes = torch.where(worse[:, None], grid_codes, codes)
    return lut, codes


def _refine(w, h, scales, zeros, lut, codes, group_size, iterations, rounds, dtype):
    """Alternate: refit (scale, zero) per group to the codes, then k-means again from the current LUT.
    A row takes a round's result only if its real-domain weighted error went down."""
    k = w.shape[1]
    best = real_domain_error(w, h, scales, zeros, lut, codes, group_size)
    for _ in range(rounds):
        s, z = fit_group_affine(w, torch.gather(lut, 1, codes), h, scales, zeros, group_size, dtype)
        x = to_code_domain(w, s, z, group_size)
        sample_weight = _sample_weight(s, h, k, group_size)
        new_lut = lloyd_max(x, sample_weight, lut, iterations).centroids.to(dtype).float()
        new_codes = nearest_code(x, new_lut)
        err = real_domain_error(w, h, s, z, new_lut, new_codes, group_size)
        # a refit scale may put some LUT entry of a group past the dtype's range (weights near its max)
        better = ((err < best) & dequant_range_ok(new_lut, s, z, dtype).all(1))[:, None]
        scales, zeros = torch.where(better, s, scales), torch.where(better, z, zeros)
        lut, codes = torch.where(better, new_lut, lut), torch.where(better, new_codes, codes)
        best = torch.minimum(err, best)
    return scales, zeros, lut, codes


def quantize_weight(
    w: torch.Tensor, config: Any4WeightOnlyConfig, channel_weight: Optional[torch.Tensor] = None
) -> QuantizedWeight:
    """Quantize a finite 2-D weight as `config` says (validation is the caller's job: any4ao.validation).

    channel_weight: optional (K,) non-negative importance of each input channel (from calibration);
    the k-means objective is sum_k channel_weight[k] * (W[n, k] - W_hat[n, k])^2 per row."""
    codebook, nbits, group_size = config.codebook.kind, config.bits, config.group_size
    iterations, refine_rounds, scaling = config.kmeans_iterations, config.refine_rounds, config.scaling
    dtype = config.lut_dtype or w.dtype
    w = w.float()
    n, k = w.shape
    h = torch.ones(1, k, dtype=torch.float64, device=w.device)
    if channel_weight is not None and codebook == "any":
        h = channel_weight.double().reshape(1, k)
        top = h.max()
        if not bool(torch.isfinite(h).all()) or bool((h < 0).any()) or not bool(top > 0):
            raise ValueError("calibration statistics must be finite, non-negative and not all zero")
        h = h / top  # the objective's scale does not matter; its range in float32 does
    if codebook == "any" and scaling == Scaling.ABSMAX:
        # Learned LUT over symmetric group scaling, started from the NF grid of the same size.
        grid = fixed_lut("nf4", 4).to(w.device) if nbits == 4 else torch.linspace(-1, 1, 2**nbits, device=w.device)
        scales, zeros = absmax_params(w, group_size, 1.0, dtype)
    elif codebook in ("any", "int"):
        grid = int_grid(nbits).to(w.device)
        scales, zeros = minmax_params(w, group_size, 0.0, float(2**nbits - 1), dtype)
    elif codebook in ("nf4", "fp4"):
        grid = fixed_lut(codebook, nbits).to(w.device)
        lut_absmax = 1.0 if codebook == "nf4" else max(FP4_E2M1_MAGNITUDES)
        scales, zeros = absmax_params(w, group_size, lut_absmax, dtype)
    else:
        raise ValueError(f"unknown codebook {codebook!r}; expected one of {CODEBOOKS}")

    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    lut = torch.empty(n, 2**nbits, dtype=torch.float32, device=w.device)
    for rows in _row_chunks(n, k):
        x = to_code_domain(w[rows], scales[rows], zeros[rows], group_size)
        if codebook == "any":
            # Real-domain error = scale^2 * code-domain error, so scale^2 joins the sample weight.
            start_scales, start_zeros = scales[rows].clone(), zeros[rows].clone()
            sample_weight = _sample_weight(scales[rows], h, k, group_size)
            chunk_lut, chunk_codes = _learn_lut(x, sample_weight, grid, iterations, dtype)
            if refine_rounds:
                scales[rows], zeros[rows], chunk_lut, chunk_codes = _refine(
                    w[rows],
                    h,
                    scales[rows],
                    zeros[rows],
                    chunk_lut,
                    chunk_codes,
                    group_size,
                    iterations,
                    refine_rounds,
                    dtype,
                )
            unsafe = ~dequant_range_ok(chunk_lut, scales[rows], zeros[rows], dtype).all(1)
            if bool(unsafe.any()):
                # a rounded learned LUT entry lands past the dtype's range in some group (weights
                # near the dtype's max): those rows keep the int grid on the safe min/max scales
                grid_rows = grid.expand(x.shape[0], -1).contiguous()
                u = unsafe[:, None]
                scales[rows] = torch.where(u, start_scales, scales[rows])
                zeros[rows] = torch.where(u, start_zeros, zeros[rows])
                chunk_lut = torch.where(u, grid_rows, chunk_lut)
                chunk_codes = torch.where(u, nearest_code(x, grid_rows), chunk_codes)
            lut[rows] = chunk_lut
        else:
            lut[rows] = grid
            chunk_codes = nearest_code(x, grid.expand(x.shape[0], -1).contiguous())
        bad = ~dequant_range_ok(lut[rows].to(dtype), scales[rows], zeros[rows], dtype).all(1)
        if bool(bad.any()):
            row = rows.start + int(bad.nonzero()[0])
            raise ValueError(
                f"row {row}: weights up to {float(w[row].abs().max()):.4g} are too close to {dtype}'s largest "
                f"value ({torch.finfo(dtype).max:.4g}) to quantize without overflow; use a wider lut_dtype"
            )
        codes[rows] = chunk_codes.to(torch.uint8)
    return QuantizedWeight(codes=codes, lut=lut.to(dtype), scale=scales.to(dtype), zero_point=zeros.to(dtype))
