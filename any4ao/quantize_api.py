"""Model-level entry points: the torchao handler for Any4WeightOnlyConfig, and `quantize_model`.

`quantize_(model, Any4WeightOnlyConfig(), filter_fn=any4ao.default_filter)` is the torchao way;
torchao passes the handler a module but not its name, so its errors name a layer by type and
shape. `quantize_model(model, config)` does the same through `quantize_` with three extras: it
validates every selected layer before touching any (a NaN in layer 20 leaves the model
unchanged), it restores the original weights if quantization fails midway, and its errors name
the layer by its path in the model.
"""

import dataclasses
import weakref
from typing import Callable, Optional

import torch
import torch.nn.utils.parametrize
from torch import nn
from torch.nn.utils.weight_norm import WeightNorm
from torchao.quantization import quantize_
from torchao.quantization.transform_module import register_quantize_module_handler

from any4ao.calibration.activation_stats import calibrate
from any4ao.config import Any4WeightOnlyConfig, ErrorFeedback
from any4ao.tensor import Any4Tensor
from any4ao.validation import check_channel_weight, check_weight

# Output projections the paper leaves in high precision (transformers names them lm_head).
SKIPPED_BY_DEFAULT = ("lm_head", "output", "embed_out")


class LayerError(ValueError):
    """A layer could not be quantized; the message starts with the layer's name."""


# module -> its path, while quantize_model runs quantize_ (torchao's handler gets no name)
_NAMES: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
# module -> the config its weight was quantized with (save_pretrained stores it in config.json)
CONFIG_OF: "weakref.WeakKeyDictionary[nn.Module, Any4WeightOnlyConfig]" = weakref.WeakKeyDictionary()


def _describe(module: nn.Module, config: Any4WeightOnlyConfig) -> str:
    """The layer's path if quantize_model or the calibration statistics (keyed by path) know it,
    else type and shape."""
    name = _NAMES.get(module)
    if name is None and config.calibration is not None:
        name = config.calibration.name_of(module)
    return name or (
        f"{type(module).__name__}(in_features={getattr(module, 'in_features', '?')}, "
        f"out_features={getattr(module, 'out_features', '?')})"
    )


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2-style Conv1D: a Linear whose weight is stored (in_features, out_features)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def nothing_quantized_error(model: nn.Module, message: str) -> LayerError:
    """The error for an any4 request that selects no layer of `model`: `message`, and the Conv1D
    layers that explain it where the model has them (GPT-2)."""
    conv1d = sum(_is_conv1d(m) for m in model.modules())
    return LayerError(
        message + (f"; its {conv1d} transformers Conv1D layers (GPT-2 style) are not supported" if conv1d else "")
    )


def _checked_inputs(module: nn.Module, config: Any4WeightOnlyConfig, parameter_name: str, name: str):
    """(weight, channel weight or None, Hessian or None) of a layer that can be quantized;
    LayerError otherwise."""
    weight = getattr(module, parameter_name, None)
    if weight is None:
        raise LayerError(f"layer {name!r} has no parameter {parameter_name!r}")
    if _is_conv1d(module):
        raise LayerError(
            f"layer {name!r} is a transformers Conv1D, whose weight is stored (in_features, out_features): "
            "any4ao quantizes weights laid out as nn.Linear's (out_features, in_features)"
        )
    if torch.nn.utils.parametrize.is_parametrized(module, parameter_name) or any(
        isinstance(hook, WeightNorm) and hook.name == parameter_name for hook in module._forward_pre_hooks.values()
    ):
        raise LayerError(
            f"layer {name!r}: {parameter_name} is computed by a parametrization or weight norm each call; "
            "remove it first (torch.nn.utils.parametrize.remove_parametrizations / remove_weight_norm)"
        )
    if isinstance(weight, Any4Tensor):
        raise LayerError(f"layer {name!r}: weight is already an Any4Tensor (quantized twice?)")
    check_weight(name, weight, config.lut_dtype)
    channel_weight = None
    if config.calibration is not None and config.codebook.learned:
        channel_weight = config.calibration.for_module(module, normalized=True)
        if channel_weight is None:
            raise LayerError(
                f"layer {name!r} has no calibration statistics: it was not called during calibration "
                f"(or the statistics belong to another model)"
            )
        check_channel_weight(name, channel_weight, weight)
    hessian = None
    if config.error_feedback == ErrorFeedback.GPTQ:
        if config.calibration is None:
            raise LayerError(
                f"layer {name!r}: error_feedback='gptq' needs calibration=any4ao.calibrate(model, tokenizer, hessian=True)"
            )
        hessian = config.calibration.hessian_for(module)
        if hessian is None:
            raise LayerError(f"layer {name!r} has no Hessian: calibrate with any4ao.calibrate(..., hessian=True)")
        if hessian.shape != (weight.shape[1], weight.shape[1]) or not bool(torch.isfinite(hessian).all()):
            raise LayerError(
                f"layer {name!r}: the Hessian has shape {tuple(hessian.shape)} or non-finite entries "
                f"(expected finite, {weight.shape[1]} x {weight.shape[1]})"
            )
    return weight, channel_weight, hessian


def quantize_module_weight(
    module: nn.Module, config: Any4WeightOnlyConfig, parameter_name: str = "weight", name: Optional[str] = None
) -> Any4Tensor:
    """Validate and quantize one module's weight; returns the new tensor without installing it."""
    name = name or _describe(module, config)
    try:
        weight, channel_weight, hessian = _checked_inputs(module, config, parameter_name, name)
    except LayerError:
        raise
    except ValueError as e:
        raise LayerError(str(e)) from e
    if channel_weight is not None:
        channel_weight = channel_weight.to(weight.device)
    try:
        return Any4Tensor.from_hp(weight.detach(), config, channel_weight, name=name, hessian=hessian)
    except ValueError as e:
        raise LayerError(f"layer {name!r}: {e}") from e


@register_quantize_module_handler(Any4WeightOnlyConfig)
def _any4_weight_only_transform(
    module: nn.Module, config: Any4WeightOnlyConfig, *, parameter_name: str = "weight"
) -> nn.Module:
    """Replace `module.<parameter_name>` in place by an Any4Tensor parameter (no module swap)."""
    from any4ao.integrations.transformers_loading import record_error, register_with_transformers_if_loaded

    register_with_transformers_if_loaded()  # save_pretrained of the quantized model needs it
    try:
        new_weight = quantize_module_weight(module, config, parameter_name)
    except LayerError as e:
        record_error(e)  # inside from_pretrained's weight conversion: re-raised instead of its RuntimeError
        raise
    setattr(module, parameter_name, nn.Parameter(new_weight, requires_grad=False))
    CONFIG_OF[module] = config
    return module


def default_filter(module: nn.Module, fqn: str) -> bool:
    """nn.Linear layers except the LM head, not yet quantized."""
    return (
        isinstance(module, nn.Linear)
        and not isinstance(module.weight, Any4Tensor)
        and fqn.split(".")[-1] not in SKIPPED_BY_DEFAULT
    )


def _progress_bar(total: int, desc: str, enabled: bool):
    """tqdm if it is installed (an optional dependency), else nothing."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if not enabled or tqdm is None:

        class _Silent:
            def update(self, n):
                pass

            def close(self):
                pass

        return _Silent()
    return tqdm(total=total, desc=desc, unit="layer")


def quantize_model(
    model: nn.Module,
    config: Optional[Any4WeightOnlyConfig] = None,
    filter_fn: Callable[[nn.Module, str], bool] = default_filter,
    progress: bool = True,
    tokenizer=None,
    calibration_text: Optional[str] = None,
) -> nn.Module:
    """Quantize `model` in place through torchao's `quantize_`, all or nothing. Returns the model.

    tokenizer: calibrate first (the paper's any4: one sample, `calibration_text` or the prompt
    shipped in any4ao/data) when the codebook is learned and `config` has no calibration yet;
    with error_feedback="gptq" the Hessians are recorded too. Without a tokenizer or calibration,
    a learned codebook minimises the plain weight error."""
    config = config or Any4WeightOnlyConfig()
    targets = [(fqn, m) for fqn, m in model.named_modules() if filter_fn(m, fqn)]
    if not targets and not any(isinstance(p, Any4Tensor) for p in model.parameters()):
        raise nothing_quantized_error(
            model,
            f"quantize_model: no layer of the {type(model).__name__} matched the filter (default: nn.Linear "
            "layers other than the LM head), so nothing would be quantized",
        )
    if tokenizer is not None and config.codebook.learned and config.calibration is None:
        gptq = config.error_feedback == ErrorFeedback.GPTQ
        stats = calibrate(model, tokenizer, text=calibration_text, hessian=gptq, filter_fn=filter_fn)
        config = dataclasses.replace(config, calibration=stats)
    for fqn, module in targets:  # validate everything before changing anything
        try:
            _checked_inputs(module, config, "weight", fqn)
        except LayerError:
            raise
        except ValueError as e:
            raise LayerError(str(e)) from e
    originals = {module: module.weight for _, module in targets}
    bar = _progress_bar(len(targets), f"any4ao {config.codebook.value}", progress)
    current = []  # the layer quantize_ is working on, for the error message

    def selected(module, fqn):
        if module in originals and filter_fn(module, fqn):
            current[:] = [fqn]
            bar.update(1)
            return True
        return False

    _NAMES.update({module: fqn for fqn, module in targets})
    try:
        quantize_(model, config, filter_fn=selected)
    except BaseException as e:
        for module, weight in originals.items():
            module.weight = weight
            CONFIG_OF.pop(module, None)
        if isinstance(e, ValueError) and not isinstance(e, LayerError) and current:  # name the layer, by its path
            raise LayerError(f"layer {current[0]!r}: {e}") from e
        raise
    finally:
        bar.close()
        for _, module in targets:
            _NAMES.pop(module, None)
    first = {}  # layers that shared one weight share its quantized copy (equal values, one storage)
    for _, module in targets:
        keeper = first.setdefault(id(originals[module]), module)
        if keeper is not module:
            module.weight = keeper.weight
    return model
