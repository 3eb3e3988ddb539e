"""Per-group scale and zero: map each group of G input channels of a row into the code domain.

Groups run along K (input channels). When G does not divide K, the last group of every row is
shorter ("ragged"); scales and zeros then have ceil(K / G) columns and nothing is padded in storage.
"""

import math

import torch


def num_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size)


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) -> (N, ceil(K/G), G). A ragged last group is filled by repeating the row's last
    value, which leaves that group's min, max and absmax unchanged."""
    n, k = w.shape
    pad = num_groups(k, group_size) * group_size - k
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    return w.reshape(n, -1, group_size)


def expand_groups(per_group: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """(N, ceil(K/G)) -> (N, K): each group's value repeated over its input channels."""
    return per_group.repeat_interleave(group_size, dim=1)[:, :in_features]


def minmax_params(w: torch.Tensor, group_size: int, lo: float, hi: float, dtype: torch.dtype):
    """Asymmetric (int4-style) scaling: the group's [min, max] maps onto [lo, hi].

    Returns float32 (scales, zeros) already rounded through the storage `dtype`, so the code
    domain computed from them is exactly what dequantization will invert."""
    g = grouped(w, group_size)
    mn, mx = g.amin(-1), g.amax(-1)
    scales = ((mx - mn) / (hi - lo)).to(dtype).float()
    zeros = (mn - lo * scales).to(dtype).float()
    return scales, zeros


def absmax_params(w: torch.Tensor, group_size: int, lut_absmax: float, dtype: torch.dtype):
    """Symmetric (nf4/fp4-style) scaling: the group's absmax maps onto the LUT's largest magnitude."""
    g = grouped(w, group_size)
    scales = (g.abs().amax(-1) / lut_absmax).to(dtype).float()
    return scales, torch.zeros_like(scales)


def to_code_domain(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """(w - zero) / scale per element; constant groups (scale 0) map to 0 and dequantize to zero."""
    k = w.shape[1]
    s = expand_groups(scales, k, group_size)
    z = expand_groups(zeros, k, group_size)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.where(s > 0, (w - z) / safe, torch.zeros_like(w))
