"""Independent float64 references used by the tests (no any4ao code on the reference side)."""

import torch


def reference_dequantize(codes, lut, scales, zeros, group_size):
    """W[n, k] = lut[n, code[n, k]] * scale[n, k // G] + zero[n, k // G], in float64, by plain indexing."""
    n, k = codes.shape
    cols = torch.arange(k)
    group = cols // group_size
    rows = torch.arange(n)[:, None]
    values = lut.double()[rows, codes.long()]
    return values * scales.double()[rows, group[None, :]] + zeros.double()[rows, group[None, :]]


def weighted_error(w, w_hat, channel_weight=None, per_row=False):
    diff2 = (w.double() - w_hat.double()).square()
    if channel_weight is not None:
        diff2 = diff2 * channel_weight.double()[None, :]
    return diff2.sum(1) if per_row else diff2.sum().item()
