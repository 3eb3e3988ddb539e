"""Input checks that turn bad weights and settings into ValueErrors that name the layer and the problem."""

import torch

from any4ao.config import FLOAT_DTYPES


def check_weight(layer: str, weight: torch.Tensor) -> None:
    """A weight any4ao can quantize: a finite 2-D float tensor."""
    if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOAT_DTYPES:
        dtype = getattr(weight, "dtype", type(weight).__name__)
        raise ValueError(f"layer {layer!r}: weight dtype {dtype} is not supported; expected one of {FLOAT_DTYPES}")
    if weight.ndim != 2:
        raise ValueError(
            f"layer {layer!r}: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}"
        )
    if weight.numel() == 0:
        raise ValueError(f"layer {layer!r}: weight is empty, shape {tuple(weight.shape)}")
    bad = ~torch.isfinite(weight)
    if bool(bad.any()):
        nan = int(torch.isnan(weight).sum())
        raise ValueError(
            f"layer {layer!r}: weight has {nan} NaN and {int(bad.sum()) - nan} Inf values; "
            f"refusing to quantize (first at index {tuple(bad.nonzero()[0].tolist())})"
        )


def check_channel_weight(layer: str, channel_weight: torch.Tensor, weight: torch.Tensor) -> None:
    """Calibration statistics must fit the layer they are applied to."""
    if channel_weight.shape != (weight.shape[1],):
        raise ValueError(
            f"layer {layer!r}: calibration statistics have shape {tuple(channel_weight.shape)}, "
            f"expected ({weight.shape[1]},) for in_features={weight.shape[1]}"
        )
    if not bool(torch.isfinite(channel_weight).all()) or bool((channel_weight < 0).any()):
        raise ValueError(f"layer {layer!r}: calibration statistics contain negative, NaN or Inf values")
