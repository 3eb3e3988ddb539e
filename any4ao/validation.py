"""Input checks that turn bad weights and settings into ValueErrors that name the layer and the problem."""

from typing import Optional

import torch

SUPPORTED_NBITS = (2, 3, 4)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_GROUP, MAX_GROUP, GROUP_MULTIPLE = 16, 8192, 16
SCALINGS = ("absmax", "minmax")


def check_settings(nbits: int, group_size: int, lut_dtype: Optional[torch.dtype], kmeans_iterations: int) -> None:
    if nbits not in SUPPORTED_NBITS:
        raise ValueError(f"nbits must be one of {SUPPORTED_NBITS}, got {nbits!r}")
    if (
        not isinstance(group_size, int)
        or group_size % GROUP_MULTIPLE
        or not MIN_GROUP <= group_size <= MAX_GROUP
    ):
        raise ValueError(
            f"group_size must be a multiple of {GROUP_MULTIPLE} between {MIN_GROUP} and {MAX_GROUP}, got {group_size!r}"
        )
    if lut_dtype is not None and lut_dtype not in FLOAT_DTYPES:
        raise ValueError(f"lut_dtype must be one of {FLOAT_DTYPES} or None, got {lut_dtype!r}")
    if not isinstance(kmeans_iterations, int) or kmeans_iterations < 0:
        raise ValueError(f"kmeans_iterations must be a non-negative int, got {kmeans_iterations!r}")


def check_learning(scaling: str, refine_rounds: int) -> None:
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    if not isinstance(refine_rounds, int) or isinstance(refine_rounds, bool) or not 0 <= refine_rounds <= 20:
        raise ValueError(f"refine_rounds must be an int in [0, 20], got {refine_rounds!r}")


def check_weight(layer: str, weight: torch.Tensor) -> None:
    """A weight any4ao can quantize: a finite 2-D float tensor."""
    from any4ao.tensor.any4_tensor import Any4Tensor

    if isinstance(weight, Any4Tensor):
        raise ValueError(f"layer {layer!r}: weight is already an Any4Tensor (quantized twice?)")
    if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOAT_DTYPES:
        dtype = getattr(weight, "dtype", type(weight).__name__)
        raise ValueError(f"layer {layer!r}: weight dtype {dtype} is not supported; expected one of {FLOAT_DTYPES}")
    if weight.ndim != 2:
        raise ValueError(f"layer {layer!r}: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
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
