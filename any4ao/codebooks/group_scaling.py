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


def _limit(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max


def next_toward_zero(x: torch.Tensor) -> torch.Tensor:
    """The representable value of x's dtype next to x toward zero, for finite x >= 0 (0 stays 0)."""
    as_int = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}.get(x.dtype)
    if as_int is None:
        return torch.nextafter(x, torch.zeros_like(x))
    bits = x.view(as_int)
    return torch.where(x > 0, (bits - 1).view(x.dtype), x)


def _safe_scale(scale: torch.Tensor, zero: torch.Tensor, lo: float, hi: float, dtype: torch.dtype) -> torch.Tensor:
    """Scales rounded to `dtype` (nearest), then stepped toward zero where the rounded-up scale would
    make lo * scale + zero or hi * scale + zero overflow the dtype (fp16 weights near +-65504: the
    nearest fp16 scale is above the exact one, and 15 * scale + min rounds to inf). Exact in
    float64. A smaller scale only moves the group's largest values onto the top code."""
    s = scale.to(dtype)
    limit = _limit(dtype)
    for _ in range(4):
        sd = s.double()
        bad = ((hi * sd + zero).abs() > limit) | ((lo * sd + zero).abs() > limit) | ~torch.isfinite(sd)
        if not bool(bad.any()):
            break
        s = torch.where(bad & torch.isfinite(sd), next_toward_zero(s), s)
        s = torch.where(torch.isfinite(s.double()), s, torch.full_like(s, limit))
    return s


def minmax_params(w: torch.Tensor, group_size: int, lo: float, hi: float, dtype: torch.dtype):
    """Asymmetric (int4-style) scaling: the group's [min, max] maps onto [lo, hi].

    Computed in float64 (max - min of fp32 weights near 3e38 overflows float32), rounded through the
    storage `dtype` so that no LUT value in [lo, hi] dequantizes past the dtype's range. Returns
    float32 (scales, zeros), so the code domain computed from them is exactly what dequantization
    will invert."""
    g = grouped(w, group_size).double()
    mn, mx = g.amin(-1), g.amax(-1)
    zeros = (mn - lo * ((mx - mn) / (hi - lo))).to(dtype) if lo else mn.to(dtype)
    scales = _safe_scale((mx - mn) / (hi - lo), zeros.double(), lo, hi, dtype)
    if lo:
        zeros = (mn - lo * scales.double()).to(dtype)
    return scales.float(), zeros.float()


def absmax_params(w: torch.Tensor, group_size: int, lut_absmax: float, dtype: torch.dtype):
    """Symmetric (nf4/fp4-style) scaling: the group's absmax maps onto the LUT's largest magnitude."""
    g = grouped(w, group_size).double()
    zeros = torch.zeros(g.shape[:-1], dtype=torch.float64, device=g.device)
    scales = _safe_scale(g.abs().amax(-1) / lut_absmax, zeros, -lut_absmax, lut_absmax, dtype)
    return scales.float(), zeros.float()


def to_code_domain(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """(w - zero) / scale per element; constant groups (scale 0) map to 0 and dequantize to zero."""
    k = w.shape[1]
    s = expand_groups(scales, k, group_size)
    z = expand_groups(zeros, k, group_size)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.where(s > 0, (w - z) / safe, torch.zeros_like(w))
