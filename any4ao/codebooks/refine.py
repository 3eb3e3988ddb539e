"""Refit each group's scale and zero to the learned codebook (alternating minimisation).

k-means learns the LUT for fixed min/max group scaling. Once codes are known, the best scale and
zero of a group are a weighted least-squares line fit:

    min_{s, z}  sum_k h_k (w_k - (s * c_k + z))^2,   c_k = lut[code_k]   (h: channel importance)

Refitting, then re-running k-means in the new code domain, can only lower the real-domain error
(before the storage-dtype rounding, which a per-row guard in quantize.py takes care of).
"""

import torch

from any4ao.codebooks.group_scaling import expand_groups, num_groups
from any4ao.codebooks.kmeans import cuda_kernels_serve


def _grouped_zero_padded(t: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = t.shape
    pad = num_groups(k, group_size) * group_size - k
    if pad:
        t = torch.cat([t, t.new_zeros(n, pad)], dim=1)
    return t.reshape(n, -1, group_size)


def fit_group_affine(w, code_values, weight, scales, zeros, group_size: int, dtype: torch.dtype):
    """Weighted least-squares (scale, zero) per group, rounded through the storage dtype.

    w, code_values, weight: (R, K). Groups whose codes are all equal, or whose fit would give a
    non-positive scale, keep their current (scales, zeros)."""
    h = _grouped_zero_padded(weight.expand_as(w).double(), group_size)  # padding has zero weight
    c = _grouped_zero_padded(code_values.double(), group_size)
    y = _grouped_zero_padded(w.double(), group_size)
    total = h.sum(-1).clamp_min(1e-300)
    c_mean = (h * c).sum(-1) / total
    y_mean = (h * y).sum(-1) / total
    cov = (h * (c - c_mean[..., None]) * (y - y_mean[..., None])).sum(-1)
    var = (h * (c - c_mean[..., None]).square()).sum(-1)
    fitted = var > 1e-12 * total
    s = torch.where(fitted, cov / var.clamp_min(1e-300), scales.double())
    keep = ~(s > 0) | (h.sum(-1) <= 0)
    s = torch.where(keep, scales.double(), s)
    z = torch.where(keep, zeros.double(), y_mean - s * c_mean)
    return s.to(dtype).float(), z.to(dtype).float()


def real_domain_error(w, weight, scales, zeros, lut, codes, group_size: int) -> torch.Tensor:
    """Per-row sum_k weight_k * (w_k - (s * lut[code_k] + z))^2 in float64 (on CUDA one fused
    kernel, any4ao.kernels.row_error)."""
    if cuda_kernels_serve(w, lut, scales, zeros):
        from any4ao.kernels.row_error import row_error

        return row_error(w, weight, lut, codes, scales, zeros, group_size)
    k = w.shape[1]
    w_hat = torch.gather(lut, 1, codes).double() * expand_groups(scales, k, group_size).double()
    w_hat = w_hat + expand_groups(zeros, k, group_size).double()
    return (weight.double() * (w.double() - w_hat).square()).sum(1)
