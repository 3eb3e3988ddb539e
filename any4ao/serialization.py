"""Save and load any4-quantized weights as safetensors, without re-running k-means.

`save_quantized(model, "model.safetensors")` flattens every Any4Tensor into plain tensors
(`<module>._weight_qdata`, `_weight_lut`, `_weight_scales`, `_weight_zeros`) plus JSON metadata,
the same layout torchao and transformers use for their own tensor subclasses (so a file written
by transformers' `save_pretrained` with `TorchAoConfig(quant_type=Any4WeightOnlyConfig())` reads
the same way). `load_quantized(path)` rebuilds the state dict; `load_quantized(path, model)`
installs it into an unquantized model of the same architecture. Every rebuilt Any4Tensor checks
its shapes, dtypes and devices, and missing, extra or unreadable parts raise ValueError naming the
tensor and the file: a bad file never loads as a silently wrong model.
"""

import dataclasses
import json
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from torch import nn

from any4ao.tensor.any4_tensor import Any4Tensor

FORMAT_KEY, FORMAT_VERSION = "any4ao_format", "1"


def save_quantized(model_or_state_dict: Union[nn.Module, Dict[str, torch.Tensor]], path, config=None) -> None:
    """Write a state dict holding Any4Tensor (and plain) tensors to a .safetensors file.
    `config` (optional, an Any4WeightOnlyConfig) is stored in the metadata for reference."""
    from safetensors.torch import save_file
    from torchao.core.config import config_to_dict
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    state = (
        model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else dict(model_or_state_dict)
    )
    state = {k: (v.detach() if type(v) is nn.Parameter else v) for k, v in state.items()}
    tensors, metadata = flatten_tensor_state_dict(state)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    metadata = {**metadata, "format": "pt", FORMAT_KEY: FORMAT_VERSION}
    if config is not None:  # calibration statistics belong to the run, not the file
        metadata["any4ao_config"] = json.dumps(config_to_dict(dataclasses.replace(config, calibration=None)))
    save_file(tensors, str(path), metadata=metadata)


def _read(path: Path, device):
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated / garbled files
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return tensors, metadata


def load_quantized(path, model: Optional[nn.Module] = None, device="cpu") -> Dict[str, torch.Tensor]:
    """Rebuild the state dict written by `save_quantized`. With `model`, also install it: each
    quantized weight replaces the module's parameter in place (no module swap), the rest goes
    through `load_state_dict(strict=True)`. Returns the state dict."""
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    path = Path(path)
    if model is not None:
        device = next(iter(model.parameters())).device
    tensors, metadata = _read(path, device)
    version = metadata.get(FORMAT_KEY)
    if version is None:
        raise ValueError(f"{path}: no {FORMAT_KEY!r} metadata, so not written by any4ao.save_quantized")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {version!r}; this any4ao reads version {FORMAT_VERSION!r}")
    try:
        names = json.loads(metadata["tensor_names"])
        state, leftover = unflatten_tensor_state_dict(tensors, metadata)
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: metadata is damaged ({type(e).__name__}: {e})") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    missing = [n for n in names if n not in state]
    if missing:
        raise ValueError(f"{path}: parts missing for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if leftover:
        raise ValueError(f"{path}: tensors not described by the metadata: {sorted(leftover)[:5]}")
    if model is not None:
        _install(model, state, path)
    return state


def _install(model: nn.Module, state: Dict[str, torch.Tensor], path: Path) -> None:
    """Check everything first, then change the model (a mismatch leaves it untouched)."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not match this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, value in state.items():
        if tuple(expected[name].shape) != tuple(value.shape):
            raise ValueError(
                f"{path}: {name!r} has shape {tuple(value.shape)}, the model's is {tuple(expected[name].shape)}"
            )
    quantized = {n: v for n, v in state.items() if isinstance(v, Any4Tensor)}
    for name, value in quantized.items():
        module_name, _, param_name = name.rpartition(".")
        setattr(model.get_submodule(module_name), param_name, nn.Parameter(value, requires_grad=False))
    model.load_state_dict({n: v for n, v in state.items() if n not in quantized}, strict=False)
