"""Model-level entry points: the torchao handler for Any4WeightOnlyConfig, and `quantize_model`.

`quantize_(model, Any4WeightOnlyConfig(), filter_fn=any4ao.default_filter)` is the torchao way;
torchao passes the handler a module but not its name, so its errors name a layer by type and
shape (by path with default_filter). torchao's walk quantizes layer after layer and does not undo:
an error in layer 20 leaves layers 0-19 quantized, and the error says so. `quantize_model(model,
config)` does the same through `quantize_` with three extras: it validates every selected layer
before touching any (a NaN in layer 20 leaves the model unchanged), it restores the original
weights if quantization fails midway, and its errors name the layer by its path in the model.
"""

import dataclasses
import gc
import sys
import threading
import warnings
import weakref
from typing import Callable, Optional

import torch
import torch.nn.utils.parametrize
from torch import nn
from torch.nn.utils.weight_norm import WeightNorm
from torchao.quantization import quantize_
from torchao.quantization.transform_module import register_quantize_module_handler

from any4ao.calibration.activation_stats import calibrate, input_embeddings, random_token_ids, vocabulary_size
from any4ao.config import Any4WeightOnlyConfig, ErrorFeedback
from any4ao.tensor import Any4Tensor
from any4ao.validation import check_channel_weight, check_hessian, check_weight

# Output projections the paper leaves in high precision (transformers names them lm_head).
SKIPPED_BY_DEFAULT = ("lm_head", "output", "embed_out")


class LayerError(ValueError):
    """A layer could not be quantized; the message starts with the layer's name."""


# set while quantize_model runs quantize_: it rolls back on error (plain quantize_ does not)
_ALL_OR_NOTHING = threading.local()
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
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        raise LayerError(
            f"layer {name!r} is an {type(module).__name__}: its forward looks rows up, and an Any4Tensor serves "
            "only matrix products (linear, mm, addmm, matmul); leave it out of filter_fn"
        )
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
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise LayerError(
            f"layer {name!r}: {parameter_name} is not initialized yet (a lazy module): run one forward first"
        )
    check_weight(name, weight, config.lut_dtype)
    channel_weight = None
    if config.calibration is not None and config.codebook.learned:
        channel_weight = config.calibration.for_module(module, normalized=True)
        if channel_weight is None:
            raise LayerError(
                f"layer {name!r} has no calibration statistics: it was not called during calibration, or on no "
                "token (an MoE expert no token was routed to), or the statistics belong to another model; "
                "calibrate on more text, or leave the layer out with filter_fn"
            )
        check_channel_weight(name, channel_weight, weight)
    hessian = None
    if config.error_feedback == ErrorFeedback.GPTQ:
        if config.calibration is None:
            raise LayerError(
                f"layer {name!r}: error_feedback='gptq' needs the layer inputs' Hessians: pass tokenizer= to "
                "quantize_model, or calibration=any4ao.calibrate(model, tokenizer, hessian=True) in the config"
            )
        hessian = config.calibration.hessian_for(module)
        if hessian is None:
            raise LayerError(f"layer {name!r} has no Hessian: calibrate with any4ao.calibrate(..., hessian=True)")
        check_hessian(name, hessian, weight)
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
        message = str(e)  # from_hp's own errors name the layer already
        raise LayerError(message if message.startswith(f"layer {name!r}") else f"layer {name!r}: {message}") from e


@register_quantize_module_handler(Any4WeightOnlyConfig)
def _any4_weight_only_transform(
    module: nn.Module, config: Any4WeightOnlyConfig, *, parameter_name: str = "weight"
) -> nn.Module:
    """Replace `module.<parameter_name>` in place by an Any4Tensor parameter (no module swap)."""
    from any4ao.integrations.transformers_loading import record_error, register_with_transformers_if_loaded

    register_with_transformers_if_loaded()  # save_pretrained of the quantized model needs it
    if isinstance(getattr(module, parameter_name, None), Any4Tensor):  # a re-run: no-op, or an error
        conflict = _layout_conflict(_describe(module, config), module, config, "quantize_")
        if conflict:
            raise LayerError(
                f"{conflict} (any4ao.quantize_model quantizes only the layers not yet quantized, for mixed layouts)"
            )
        return module
    if not getattr(_ALL_OR_NOTHING, "active", False) and _held_elsewhere(module, parameter_name):
        warnings.warn(
            f"quantize_: layer {_describe(module, config)} shares its {parameter_name} with another module (a tied "
            "input embedding, as in GPT-2, or another layer), which keeps the unquantized copy: the tie ends and "
            "the model now holds both. torchao's default filter selects every nn.Linear, LM heads included; pass "
            "filter_fn=any4ao.default_filter (leaves LM heads out) or use any4ao.quantize_model, which names "
            "the tied layers and the layers it cannot quantize (transformers Conv1D)",
            stacklevel=2,
        )
    try:
        new_weight = quantize_module_weight(module, config, parameter_name)
    except LayerError as e:
        if record_error(e) or getattr(_ALL_OR_NOTHING, "active", False):
            raise  # from_pretrained re-raises it instead of its RuntimeError; quantize_model rolls back
        raise LayerError(
            f"{e} (torchao's quantize_ changes layers one at a time and does not undo: the layers it "
            "reached before this one are quantized now; any4ao.quantize_model(model, config) checks every "
            "layer first and leaves the model unchanged on an error)"
        ) from e
    setattr(module, parameter_name, nn.Parameter(new_weight, requires_grad=False))
    # without its calibration: the statistics name (hold) the modules, and a value that holds its own
    # weak key keeps the entry, the model and any Hessians alive for good
    CONFIG_OF[module] = config if config.calibration is None else dataclasses.replace(config, calibration=None)
    return module


def _held_elsewhere(module: nn.Module, parameter_name: str) -> bool:
    """Whether another module holds this module's parameter (a tied weight). The reference count
    rules out the common, untied case at no cost; only a parameter with extra references pays for
    scans of the garbage collector's objects: the dicts that hold it, and among them those that are
    a module's _parameters (a user's dict(model.named_parameters()) is not a tie)."""
    weight = module._parameters.get(parameter_name)
    if weight is None or sys.getrefcount(weight) <= 3:  # module._parameters, `weight`, getrefcount's argument
        return False
    mine = module._parameters
    holders = [
        d
        for d in gc.get_referrers(weight)
        if type(d) is dict and d is not mine and any(v is weight for v in d.values())  # _parameters is a plain dict
    ]
    return any(
        isinstance(owner, dict) and owner.get("_parameters") is d for d in holders for owner in gc.get_referrers(d)
    )


def _layout_conflict(fqn: str, module: nn.Module, config: Any4WeightOnlyConfig, caller: str) -> Optional[str]:
    """For a layer already quantized: None if `config` is what it was quantized with (a re-run is a
    no-op), else the error. Calibration statistics are not compared (each run records its own);
    without a record of the config (a loaded or copied model), the tensor's bits, group size, dtype
    and kernel preference are. Another config would be silently ignored, hence an error."""
    w = module.weight
    recorded = CONFIG_OF.get(module)
    if recorded is not None:  # (lut_dtype None means the weight's: compared as what it resolved to)
        resolved = dataclasses.replace(recorded, lut_dtype=recorded.lut_dtype or w.dtype)
        wanted = dataclasses.replace(config, calibration=None, lut_dtype=config.lut_dtype or w.dtype)
        differ = [f.name for f in dataclasses.fields(wanted) if getattr(resolved, f.name) != getattr(wanted, f.name)]
        have = f"{recorded.codebook.value} at group {recorded.group_size}"
    else:
        differ = [
            name
            for name, mine, theirs in (
                ("bits", w.nbits, config.bits),
                ("group_size", w.group_size, config.group_size),
                ("lut_dtype", w.dtype, config.lut_dtype or w.dtype),
                ("kernel_preference", w.kernel_preference, config.kernel_preference.value),
            )
            if mine != theirs
        ]
        have = f"{w.nbits}-bit at group {w.group_size}, {w.dtype}"
    if not differ:
        return None
    return (
        f"layer {fqn!r} is already quantized ({have}); {caller} does not re-quantize, so a config that differs "
        f"in {', '.join(differ)} would be ignored: start from the unquantized model"
    )


def _check_same_layout(model: nn.Module, config: Any4WeightOnlyConfig) -> None:
    """_layout_conflict for every quantized layer of `model`."""
    for fqn, module in model.named_modules():
        if isinstance(getattr(module, "weight", None), Any4Tensor):
            conflict = _layout_conflict(fqn, module, config, "quantize_model")
            if conflict:
                raise LayerError(conflict)


def _warn_of_ties_broken(model: nn.Module, targets) -> None:
    """A selected layer whose weight another module also holds (a tied LM head and its input
    embedding) gets its own quantized copy: the tie ends, and a checkpoint of the model loads only
    into an untied one. Said, not refused: it is what a filter that selects lm_head asks for."""
    selected = {id(m.weight): fqn for fqn, m in targets if getattr(m, "weight", None) is not None}
    chosen = {id(m) for _, m in targets}
    for fqn, module in model.named_modules():
        if id(module) in chosen:
            continue
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in selected:
                warnings.warn(
                    f"quantize_model: {selected[id(param)]!r} shares its weight with {fqn}.{pname} "
                    f"({type(module).__name__}), which is not quantized: the tie ends. Its checkpoint loads "
                    "into untied models only (e.g. config.tie_word_embeddings=False); the default filter leaves "
                    "the LM head out",
                    stacklevel=3,
                )


def default_filter(module: nn.Module, fqn: str) -> bool:
    """nn.Linear layers except the LM head. A selected layer's path is noted, so that errors raised
    while torchao's quantize_ quantizes it name the layer (the handler gets only the module). Layers
    already quantized are selected too: the handler leaves them as they are if the config is the one
    they were quantized with and refuses another, which skipping them would silently ignore.
    (quantize_model skips them: a second quantize_model quantizes the rest, for mixed layouts.)"""
    selected = isinstance(module, nn.Linear) and fqn.split(".")[-1] not in SKIPPED_BY_DEFAULT
    if selected:
        _NAMES.setdefault(module, fqn)
    return selected


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


CALIBRATION_CHOICES = ("auto", "text", "random-ids", "none")
RANDOM_CALIBRATION_TOKENS = 600


def _can_run_random_ids(model: nn.Module, targets) -> bool:
    """A token model with a vocabulary whose input embedding and selected layers hold real weights
    (a meta weight cannot be calibrated; quantize_model's own checks name it)."""
    if vocabulary_size(model) is None:
        return False
    weights = [getattr(input_embeddings(model), "weight", None)] + [getattr(m, "weight", None) for _, m in targets]
    return not any(isinstance(w, torch.Tensor) and w.is_meta for w in weights)


def _calibrated(model, config, targets, filter_fn, tokenizer, calibration_text, calibration) -> Any4WeightOnlyConfig:
    """`config` with the calibration quantize_model's `calibration` argument asks for (its docstring)."""
    if calibration not in CALIBRATION_CHOICES:
        raise ValueError(f"quantize_model: calibration={calibration!r}, expected one of {CALIBRATION_CHOICES}")
    if calibration_text is not None and tokenizer is None:
        raise ValueError("quantize_model: calibration_text needs the tokenizer that turns it into token ids")
    gptq = config.error_feedback == ErrorFeedback.GPTQ
    mode = calibration
    if mode == "auto":
        mode = (
            "text"
            if tokenizer is not None
            else "random-ids"
            if not gptq and _can_run_random_ids(model, targets)
            else "none"
        )
    if calibration_text is not None and (mode != "text" or config.calibration is not None):
        raise ValueError(
            "quantize_model: calibration_text would be ignored: "
            + ("the config already carries a calibration" if mode == "text" else f"calibration={calibration!r}")
        )
    if mode == "none" or not targets or not config.codebook.learned or config.calibration is not None:
        return config
    if mode == "text":
        if tokenizer is None:
            raise ValueError("quantize_model: calibration='text' needs a tokenizer")
        stats = calibrate(model, tokenizer, text=calibration_text, hessian=gptq, filter_fn=filter_fn)
        return dataclasses.replace(config, calibration=stats)
    ids = random_token_ids(model, RANDOM_CALIBRATION_TOKENS)  # calibrate cuts it to the model's context
    try:
        stats = calibrate(model, input_ids=ids, hessian=gptq, filter_fn=filter_fn)
    except Exception as e:
        how = "the default without a tokenizer" if calibration == "auto" else "calibration='random-ids'"
        raise ValueError(
            f"quantize_model: calibrating the {type(model).__name__} on random token ids ({how}) failed: "
            f"{type(e).__name__}: {e}. Pass a tokenizer, calibration='none' (plain weight error), or "
            "Any4WeightOnlyConfig(calibration=any4ao.calibrate(model, input_ids=...))"
        ) from e
    return dataclasses.replace(config, calibration=stats)


def quantize_model(
    model: nn.Module,
    config: Optional[Any4WeightOnlyConfig] = None,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = default_filter,
    progress: bool = True,
    tokenizer=None,
    calibration_text: Optional[str] = None,
    calibration: str = "auto",
) -> nn.Module:
    """Quantize `model` in place through torchao's `quantize_`, all or nothing. Returns the model.

    A learned codebook whose `config` has no calibration yet is calibrated first on one sample
    (the paper's any4), chosen by `calibration`:
      "auto"        "text" when a tokenizer is given, else "random-ids" for a model with a
                    vocabulary (config.vocab_size or an input embedding; not with
                    error_feedback="gptq", whose Hessians were only measured on text), else "none";
      "text"        `calibration_text` (default: the prompt shipped in any4ao/data), tokenized;
      "random-ids"  600 token ids drawn uniformly from the vocabulary, seed 0 (random_token_ids):
                    no text needed; 7-13 % lower perplexity than "none" on SmolLM2 and Gemma 3,
                    0.6-5 % higher than "text" on most families
                    (benchmarks/results/eval-random-calibration-NOTE.md);
      "none"        the plain weight error.
    Nothing is calibrated when no layer is left to quantize; calibration_text that would go unused
    is an error.
    With error_feedback="gptq" the Hessians are recorded too."""
    config = Any4WeightOnlyConfig() if config is None else config
    if not isinstance(config, Any4WeightOnlyConfig):
        raise TypeError(
            f"quantize_model: config must be an any4ao.Any4WeightOnlyConfig, got {type(config).__name__} "
            "(other torchao configs go through torchao's quantize_)"
        )
    config = dataclasses.replace(config)  # its checks again: fields assigned after construction ("nf4")
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model: model must be a torch.nn.Module, got {type(model).__name__}")
    filter_fn = default_filter if filter_fn is None else filter_fn  # None: the default, as in torchao's quantize_
    if not callable(filter_fn):
        raise TypeError(f"quantize_model: filter_fn must be callable (module, fqn) -> bool, got {filter_fn!r}")
    targets = [
        (fqn, m)
        for fqn, m in model.named_modules()
        if filter_fn(m, fqn) and not isinstance(getattr(m, "weight", None), Any4Tensor)
    ]
    if not targets and not any(isinstance(p, Any4Tensor) for p in model.parameters()):
        raise nothing_quantized_error(
            model,
            f"quantize_model: no layer of the {type(model).__name__} matched the filter (default: nn.Linear "
            "layers other than the LM head), so nothing would be quantized",
        )
    if not targets:
        _check_same_layout(model, config)
    if config.lut_dtype is not None:
        other = {str(m.weight.dtype) for _, m in targets if getattr(m, "weight", None) is not None}
        other = sorted(other - {str(config.lut_dtype)})
        if other:
            warnings.warn(
                f"quantize_model: lut_dtype={config.lut_dtype} differs from the weights' dtype ({', '.join(other)}); "
                f"the quantized layers will take inputs of {config.lut_dtype} only, as nn.Linear takes its "
                f"weight's dtype: run the model in {config.lut_dtype} (model.to({config.lut_dtype}))",
                stacklevel=2,
            )
    config = _calibrated(model, config, targets, filter_fn, tokenizer, calibration_text, calibration)
    for fqn, module in targets:  # validate everything before changing anything
        try:
            _checked_inputs(module, config, "weight", fqn)
        except LayerError:
            raise
        except ValueError as e:
            raise LayerError(str(e)) from e
    _warn_of_ties_broken(model, targets)
    sharers = {}  # layers that share one weight: one quantized copy, fitted to all their inputs
    for fqn, module in targets:
        sharers.setdefault(id(module.weight), []).append(module)
    shared = [group for group in sharers.values() if len(group) > 1]
    if shared and config.calibration is not None:
        config = dataclasses.replace(config, calibration=config.calibration.merged(shared))
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
    outer_walk, _ALL_OR_NOTHING.active = getattr(_ALL_OR_NOTHING, "active", False), True
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
        _ALL_OR_NOTHING.active = outer_walk
        bar.close()
        for _, module in targets:
            _NAMES.pop(module, None)
    first = {}  # layers that shared one weight share its quantized copy (equal values, one storage)
    for _, module in targets:
        keeper = first.setdefault(id(originals[module]), module)
        if keeper is not module:
            module.weight = keeper.weight
    return model
