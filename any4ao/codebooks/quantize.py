"""Quantize one weight matrix into (codes, per-row LUT, per-group scales and zeros).

W[n, k] ~= lut[n, code[n, k]] * scales[n, k // G] + zeros[n, k // G]

Codebooks:
  "any"  learned per-row LUT: weighted k-means per row (the any4 paper's method; nbits 2, 3 or 4
         give any2/any3/any4), started from several (scaling, grid) pairs -- min/max + int grid
         (the paper's), absmax + nf4, absmax + fp4 -- keeping per row the start that ends with the
         lowest weighted error
  "int"  the uniform grid 0..2**nbits-1 with the same min/max scaling (int4 when nbits=4)
  "nf4"  QLoRA normal-float values with absmax scaling
  "fp4"  e2m1 values with absmax scaling
"""

from dataclasses import dataclass
from typing import Optional

import torch

from any4ao.codebooks.fixed import FP4_E2M1_MAGNITUDES, fixed_lut, int_grid
from any4ao.codebooks.group_scaling import absmax_params, expand_groups, grouped, minmax_params, to_code_domain
from any4ao.codebooks.kmeans import cuda_kernels_serve, lloyd_max, nearest_code, weighted_sse
from any4ao.codebooks.refine import fit_group_affine, real_domain_error
from any4ao.config import Any4WeightOnlyConfig, Scaling
from any4ao.validation import dequant_range_ok

CODEBOOKS = ("any", "int", "nf4", "fp4")
# Rows are processed in chunks of about this many elements, bounding k-means' working memory
# (a handful of float32 and float64 temporaries of this size) independently of the layer's size.
# GPUs take larger chunks: each chunk costs a few hundred kernel launches, whatever its size.
CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 25}
# Positive k-means sample weights are kept at or above this (they are normalised to a row maximum of
# 1 first), so that no positive weight is a float32 denormal, whose products with x lose their bits.
MIN_SAMPLE_WEIGHT = 1e-24


@dataclass
class QuantizedWeight:
    codes: torch.Tensor  # (N, K) uint8, unpacked
    lut: torch.Tensor  # (N, 2**nbits), storage dtype, sorted per row
    scale: torch.Tensor  # (N, ceil(K/G)), storage dtype
    zero_point: torch.Tensor  # (N, ceil(K/G)), storage dtype


def _row_chunks(num_rows: int, in_features: int, device=None):
    elements = CHUNK_ELEMENTS.get(getattr(device, "type", "cpu"), CHUNK_ELEMENTS["cpu"])
    step = max(1, elements // max(1, in_features))
    for start in range(0, num_rows, step):
        yield slice(start, min(num_rows, start + step))


def _sample_weight(scales: torch.Tensor, h: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """k-means sample weights h_k * scale_g(k)^2, normalised per row before squaring and again after
    (in float64): scale^2 of weights near 1e30 overflows float32 and of weights near 1e-30 (or fp32
    denormals) underflows to 0, which left k-means with Inf/NaN or all-zero weights. A per-row
    constant does not change the row's k-means solution. On CUDA one fused kernel computes the same
    (any4ao.kernels.sample_weight)."""
    if cuda_kernels_serve(scales):
        from any4ao.kernels.sample_weight import sample_weight

        return sample_weight(scales, h, k, group_size, MIN_SAMPLE_WEIGHT)
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
    # the grid as the fixed codebook stores it (rounded to the dtype too): the start choice below
    # compares what will be stored, so no row ends worse than that fixed codebook
    grid_rows = grid.to(dtype).float().expand_as(lut).contiguous()
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


def _start_points(nbits: int, scaling: Scaling, device):
    """The (scaling, grid, grid's absmax) pairs k-means starts from. Each start's k-means can only
    improve on its grid under the same scales, so keeping per row the best start makes any4 at
    least as good as int (min/max), nf4 and fp4 (absmax) on every row, under its objective."""
    starts = []
    if scaling in (Scaling.AUTO, Scaling.MINMAX):
        starts.append(("minmax", int_grid(nbits), None))
    if scaling in (Scaling.AUTO, Scaling.ABSMAX):
        if nbits == 4:
            starts.append(("absmax", fixed_lut("nf4", 4), 1.0))
            if scaling == Scaling.AUTO:
                # fp4 has two zeros; k-means starts with the second moved to -0.25 (between -0.5
                # and 0): one more distinct value can only lower the first assignment's error, so
                # the result is still never worse than fp4, and no cluster starts empty
                fp4 = fixed_lut("fp4", 4).clone()
                fp4[7] = -0.25
                starts.append(("absmax", fp4, max(FP4_E2M1_MAGNITUDES)))
        else:
            starts.append(("absmax", torch.linspace(-1, 1, 2**nbits), 1.0))
    return [(kind, grid.to(device), absmax) for kind, grid, absmax in starts]


def _group_params(w, kind, grid, absmax, group_size, dtype):
    if kind == "minmax":
        return minmax_params(w, group_size, float(grid[0]), float(grid[-1]), dtype)
    return absmax_params(w, group_size, absmax, dtype)


def _fit_start(w, h, grid, scales, zeros, config, dtype):
    """k-means from one start, for a chunk of rows: (lut, codes, per-row real-domain weighted error)."""
    x = to_code_domain(w, scales, zeros, config.group_size)
    sample_weight = _sample_weight(scales, h, w.shape[1], config.group_size)
    lut, codes = _learn_lut(x, sample_weight, grid, config.kmeans_iterations, dtype)
    return lut, codes, real_domain_error(w, h, scales, zeros, lut, codes, config.group_size)


def _keep_safe(w, grid_rows, scales, zeros, lut, codes, start_scales, start_zeros, group_size, dtype):
    """Rows where a rounded learned LUT entry lands past the dtype's range in some group (weights
    near its max) keep their start's grid on its safe scales."""
    unsafe = ~dequant_range_ok(lut, scales, zeros, dtype).all(1)
    if not bool(unsafe.any()):
        return scales, zeros, lut, codes
    u = unsafe[:, None]
    scales, zeros = torch.where(u, start_scales, scales), torch.where(u, start_zeros, zeros)
    grid_codes = nearest_code(to_code_domain(w, scales, zeros, group_size), grid_rows)
    return scales, zeros, torch.where(u, grid_rows, lut), torch.where(u, grid_codes, codes)


def _learned(w, h, config, dtype):
    """Learned LUTs: k-means from every start point, the best kept per row, then the winner's
    group scales and zeros refitted (each round kept only where it lowers the row's error)."""
    n, k = w.shape
    starts = _start_points(config.bits, config.scaling, w.device)
    params = [_group_params(w, kind, grid, absmax, config.group_size, dtype) for kind, grid, absmax in starts]
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    lut = torch.empty(n, 2**config.bits, dtype=torch.float32, device=w.device)
    scales, zeros = params[0][0].clone(), params[0][1].clone()
    for rows in _row_chunks(n, k, w.device):
        best = None
        for i, ((_, grid, _), (s, z)) in enumerate(zip(starts, params)):
            chunk_lut, chunk_codes, err = _fit_start(w[rows], h, grid, s[rows], z[rows], config, dtype)
            if best is None:
                best = [torch.zeros(err.shape, dtype=torch.long, device=w.device), chunk_lut, chunk_codes, err]
                continue
            better = err < best[3]
            b = better[:, None]
            best = [
                torch.where(better, i, best[0]),
                torch.where(b, chunk_lut, best[1]),
                torch.where(b, chunk_codes, best[2]),
                torch.minimum(err, best[3]),
            ]
        choice = best[0][:, None]
        start_s = torch.stack([s[rows] for s, _ in params]).gather(0, choice.expand(-1, scales.shape[1])[None])[0]
        start_z = torch.stack([z[rows] for _, z in params]).gather(0, choice.expand(-1, scales.shape[1])[None])[0]
        grids = torch.stack([grid for _, grid, _ in starts])[best[0]]
        chunk_s, chunk_z, chunk_lut, chunk_codes = start_s, start_z, best[1], best[2]
        if config.refine_rounds:
            chunk_s, chunk_z, chunk_lut, chunk_codes = _refine(
                w[rows], h, chunk_s, chunk_z, chunk_lut, chunk_codes, config.group_size,
                config.kmeans_iterations, config.refine_rounds, dtype,
            )  # fmt: skip
        scales[rows], zeros[rows], lut[rows], chunk_codes = _keep_safe(
            w[rows], grids, chunk_s, chunk_z, chunk_lut, chunk_codes, start_s, start_z, config.group_size, dtype
        )
        codes[rows] = chunk_codes.to(torch.uint8)
    return codes, lut, scales, zeros


def _fixed(w, codebook, nbits, config, dtype):
    n, k = w.shape
    grid = fixed_lut(codebook, nbits).to(w.device)
    kind = "minmax" if codebook == "int" else "absmax"
    absmax = 1.0 if codebook == "nf4" else max(FP4_E2M1_MAGNITUDES)
    scales, zeros = _group_params(w, kind, grid, absmax, config.group_size, dtype)
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    for rows in _row_chunks(n, k, w.device):
        x = to_code_domain(w[rows], scales[rows], zeros[rows], config.group_size)
        codes[rows] = nearest_code(x, grid.expand(x.shape[0], -1).contiguous()).to(torch.uint8)
    return codes, grid.expand(n, -1).contiguous(), scales, zeros


def _importance(channel_weight, k, device):
    """(1, K) float64 objective weights, max 1 (the objective's scale does not matter; its range
    in float32 does)."""
    if channel_weight is None:
        return torch.ones(1, k, dtype=torch.float64, device=device)
    h = channel_weight.double().reshape(1, k).to(device)
    top = h.max()
    if not bool(torch.isfinite(h).all()) or bool((h < 0).any()) or not bool(top > 0):
        raise ValueError("calibration statistics must be finite, non-negative and not all zero")
    return h / top


def _check_scales_not_lost(w, scales, zeros, group_size: int, dtype) -> None:
    """A group whose scale rounds to 0 in the storage dtype dequantizes to its zero point: right for a
    constant group, a silent collapse where the group spreads by more than rounding of its row's
    largest weight (weights of std 1e-7 under an fp16 LUT came out with an error larger than the
    weights themselves)."""
    zero_scale = scales == 0
    if not bool(zero_scale.any()):
        return
    g = grouped(w, group_size)
    spread = (g - zeros[..., None]).abs().amax(-1)
    # measured against the row: a group of tiny weights in a row of ordinary ones loses nothing that matters
    lost = zero_scale & (spread > 2**-6 * w.abs().amax(1, keepdim=True))
    if bool(lost.any()):
        row, group = (int(i) for i in lost.nonzero()[0])
        raise ValueError(
            f"row {row}, group {group}: weights up to {float(g[row, group].abs().max()):.3g} spread below "
            f"{dtype}'s smallest values, so their group scale rounds to 0 and they would all dequantize to one "
            "value; use a wider lut_dtype, scale the weights up first, or leave this layer unquantized"
        )


def quantize_weight(
    w: torch.Tensor,
    config: Any4WeightOnlyConfig,
    channel_weight: Optional[torch.Tensor] = None,
    hessian: Optional[torch.Tensor] = None,
) -> QuantizedWeight:
    """Quantize a finite 2-D weight as `config` says (validation is the caller's job: any4ao.validation).

    channel_weight: optional (K,) non-negative importance of each input channel (from calibration);
    the k-means objective is sum_k channel_weight[k] * (W[n, k] - W_hat[n, k])^2 per row.
    hessian: (K, K) second moment of the layer's inputs, for config.error_feedback="gptq": codes
    are then chosen column by column with GPTQ's error feedback (any4ao.codebooks.gptq)."""
    codebook, nbits = config.codebook.kind, config.bits
    dtype = config.lut_dtype or w.dtype
    w = w.float()
    if codebook == "any":
        h = _importance(channel_weight, w.shape[1], w.device)
        codes, lut, scales, zeros = _learned(w, h, config, dtype)
    elif codebook in ("int", "nf4", "fp4"):
        codes, lut, scales, zeros = _fixed(w, codebook, nbits, config, dtype)
    else:
        raise ValueError(f"unknown codebook {codebook!r}; expected one of {CODEBOOKS}")
    _check_scales_not_lost(w, scales, zeros, config.group_size, dtype)
    bad = ~dequant_range_ok(lut.to(dtype), scales, zeros, dtype).all(1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ValueError(
            f"row {row}: weights up to {float(w[row].abs().max()):.4g} are too close to {dtype}'s largest "
            f"value ({torch.finfo(dtype).max:.4g}) to quantize without overflow; "
            + ("use a wider lut_dtype" if dtype.itemsize < 4 else "scale the weights down first (no wider lut_dtype)")
        )
    if hessian is not None:
        from any4ao.codebooks.gptq import gptq_codes

        lut_stored = lut.to(dtype).float()
        codes = gptq_codes(w, hessian, lut_stored, scales, zeros, config.group_size, config.gptq_damp, nearest=codes)
    return QuantizedWeight(codes=codes, lut=lut.to(dtype), scale=scales.to(dtype), zero_point=zeros.to(dtype))
