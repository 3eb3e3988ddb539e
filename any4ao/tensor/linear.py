"""Matmul with an Any4Tensor weight: the Triton op on CUDA (any4ao.kernels.selector picks the
kernel), dequantize + F.linear elsewhere (CPU, fp32 activations, kernel_preference="dequantize")."""

import warnings
from typing import Optional

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F


def check_dtype(x: torch.Tensor, weight) -> None:
    """Activations and weight of one dtype, whichever orientation the weight is used in."""
    if x.dtype != weight.scale.dtype:  # the weight's dtype (scale's, see Any4Tensor.__new__)
        hint = f"cast the input to {weight.dtype}"
        if x.dtype.is_floating_point:
            hint = (
                f"put the model in one dtype: model.to({weight.dtype}) keeps the quantized weights' dtype, "
                f"model.to({x.dtype}) converts them"
            )
        raise ValueError(
            f"any4 linear: input dtype {x.dtype} does not match the Any4Tensor dtype {weight.dtype}; {hint}"
        )


def _check_operands(x: torch.Tensor, weight, dtype: bool = True) -> None:
    # The weight's parts and cached attributes, not the wrapper's .dtype / .device / .shape: on a
    # tensor subclass those go through __torch_function__, a microsecond of host time each.
    if x.shape[-1] != weight.in_features:
        raise ValueError(
            f"any4 linear: input has {x.shape[-1]} features in its last dimension but the weight "
            f"expects in_features={weight.in_features} (weight shape {tuple(weight.shape)})"
        )
    if dtype:
        check_dtype(x, weight)
    if x.device != weight.qdata.device:
        raise ValueError(f"any4 linear: input is on {x.device} but the weight is on {weight.device}")


def _plain_linear_needed(x: torch.Tensor) -> bool:
    """Where the custom op would be wrong, F.linear on the dequantized weight serves: forward-mode
    AD (the op has no jvp: the tangent would be dropped) and functorch transforms (vmap, jvp, grad
    wrap x)."""
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return True
    return _forward_ad._current_level >= 0 and _forward_ad.unpack_dual(x).tangent is not None


def warn_if_trainable(weight, stacklevel: int = 3) -> None:
    """Warned where it matters, in a product, not on requires_grad_ (transformers' loading sets it):
    the weight gets no gradient on any path."""
    if torch.is_grad_enabled() and weight.requires_grad:
        warnings.warn(
            "an Any4Tensor weight has requires_grad=True but gets no gradient (the packed codes are not "
            "trainable): train adapters (e.g. LoRA) on top, or dequantize to fine-tune",
            stacklevel=stacklevel,
        )


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast computes in on this device type, or None where it is off (meta tensors
    have no autocast)."""
    if device_type != "meta" and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def any4_linear(x: torch.Tensor, weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ W.T (+ bias) for an untransposed Any4Tensor W of shape (N, K)."""
    warn_if_trainable(weight)
    cast = autocast_dtype(x.device.type)
    if cast is not None:
        if x.dtype != cast or weight.scale.dtype != cast:  # F.linear casts both, as for nn.Linear
            _check_operands(x, weight, dtype=False)
            return F.linear(x, weight.dequantize(cast), bias)
        bias = None if bias is None else bias.to(cast)  # as autocast does for F.linear
    _check_operands(x, weight)
    from any4ao.kernels.selector import fused_linear_applies

    if fused_linear_applies(x, weight) and not _plain_linear_needed(x):
        from any4ao.kernels import ops

        if bias is not None and bias.dtype != x.dtype:  # as F.linear: no silent promotion
            raise ValueError(f"any4 linear: bias dtype {bias.dtype} does not match the input dtype {x.dtype}")
        x2 = x.reshape(-1, x.shape[-1])
        # eager inference: the op's body as a plain function, without the dispatcher (host time)
        op = ops.lut_linear if ops.direct_call_applies(x2) else torch.ops.any4ao.lut_linear
        out = op(
            x2,
            weight.qdata,
            weight.lut,
            weight.scale,
            weight.zero_point,
            weight.nbits,
            weight.group_size,
            weight.in_features,
        )
        out = out.reshape(*x.shape[:-1], weight.out_features)
        return out if bias is None else out + bias
    return F.linear(x, weight.dequantize(x.dtype), bias)
