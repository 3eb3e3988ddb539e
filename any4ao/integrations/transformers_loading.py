"""Let transformers' torchao quantizer load Any4Tensor checkpoints.

When loading a pre-quantized torchao checkpoint, transformers gathers the flattened parts of each
quantized weight by a fixed list of suffixes (`_weight_qdata`, `_weight_scale`,
`_weight_zero_point`, ...). Any4Tensor's parts are `qdata`, `lut`, `scale`, `zero_point`; this adds
`lut` to that list, so `AutoModelForCausalLM.from_pretrained(path)` rebuilds the Any4Tensor weights
without re-quantizing.

When: `import any4ao` registers at once if transformers' models are loaded, else right after they
load (`register_when_transformers_loads`, an import hook: `import any4ao` alone never imports
transformers). Every Any4WeightOnlyConfig also calls `register_with_transformers_if_loaded()`, and
`register_with_transformers()` can be called explicitly.

Two shapes of transformers are handled (both verified by tests/test_serialization.py):
  - newer releases (5.23+) list the suffixes in the quantizer's `serialized_names` property;
  - older 5.x releases (5.17) build `WeightConverter(source_patterns=[...])` objects in
    `get_weight_conversions()`; those converters are rebuilt with the extra suffix.

The same registration adds the validation layer to transformers' torchao path:
  - save: `get_state_dict_and_metadata` adds a checksum (xxh3_64) of every Any4Tensor part and of its
    metadata entry (any4ao.validation); `PreTrainedModel.save_pretrained` of a model holding
    Any4Tensor weights but no torchao quantizer (quantized by quantize_model / quantize_, also
    after a GGUF load) gets one for the duration of the save, so config.json records the
    quantization and from_pretrained rebuilds the Any4Tensor weights; a model it cannot save
    fails before anything is written (transformers writes config.json before the weights);
  - load: each rebuilt Any4Tensor's parts are checked against those checksums and its values
    validated; every error names the weight and the checkpoint file(s).
"""

import dataclasses
import os
import sys
import threading
import warnings

EXTRA_SUFFIXES = ("lut",)
_registered = False


def _with_extra_names(names):
    return {
        param: list(parts) + [f"_{param}_{s}" for s in EXTRA_SUFFIXES if f"_{param}_{s}" not in parts]
        for param, parts in names.items()
    }


def _patch_serialized_names(quantizer_cls, original: property) -> None:
    quantizer_cls.serialized_names = property(lambda self: _with_extra_names(original.fget(self)))


def _patch_weight_conversions(quantizer_cls) -> None:
    from transformers.core_model_loading import WeightConverter

    original = quantizer_cls.get_weight_conversions

    def get_weight_conversions(self):
        converters = []
        for conv in original(self):
            targets = conv.target_patterns
            if isinstance(conv, WeightConverter) and len(targets) == 1:
                extra = [f"_{targets[0]}_{s}" for s in EXTRA_SUFFIXES]
                sources = list(conv.source_patterns) + [p for p in extra if p not in conv.source_patterns]
                conv = WeightConverter(source_patterns=sources, target_patterns=targets, operations=conv.operations)
            converters.append(conv)
        return converters

    quantizer_cls.get_weight_conversions = get_weight_conversions


def register_with_transformers_if_loaded() -> None:
    """Register if transformers has been imported (never imports it otherwise)."""
    if not _registered and "transformers" in sys.modules:
        register_with_transformers()


# PreTrainedModel (whose from_pretrained / save_pretrained registration wraps) lives here
_MODELING = "transformers.modeling_utils"


def register_when_transformers_loads() -> None:
    """Register now if transformers' models are loaded, else right after they are (an import hook;
    `import any4ao` still imports no transformers). Without it, the first from_pretrained of an any4
    checkpoint in a process ran unwrapped: registration happened inside it, when the checkpoint's
    config built an Any4WeightOnlyConfig, too late for its dtype cast and its errors."""
    if _registered:
        return
    if _MODELING in sys.modules:
        register_with_transformers_if_loaded()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(_MODELING, register_with_transformers))


class _AfterImport:
    """A meta-path finder that lets the normal finders find module `name`, and runs `callback` once
    the module has executed (a post-import hook, as wrapt's). Failures of the callback only warn:
    the user's import must not break."""

    def __init__(self, name: str, callback):
        self.name, self.callback, self._finding = name, callback, False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name or self._finding:
            return None
        import importlib.util

        self._finding = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding = False
        if spec is None or spec.loader is None:
            return None
        spec.loader = _LoaderThenCall(spec.loader, self)
        return spec

    def done(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        try:
            self.callback()
        except Exception as e:  # (registration must never break the user's import of transformers)
            warnings.warn(f"any4ao: registering with transformers failed ({type(e).__name__}: {e})", stacklevel=2)


class _LoaderThenCall:
    """The module's own loader, with the hook's callback after exec_module; everything else (get_source
    for inspect, ...) is the loader's."""

    def __init__(self, loader, hook: _AfterImport):
        self._loader, self._hook = loader, hook

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._hook.done()

    def __getattr__(self, name):
        return getattr(self._loader, name)


# from_pretrained verifies the checksums save_pretrained wrote (False: skip, for speed)
VERIFY_CHECKSUMS = True
_SKIP_CHECKSUMS = "set any4ao.integrations.transformers_loading.VERIFY_CHECKSUMS = False to load it anyway"
# errors our checks raised inside transformers' weight conversion, which catches them and raises a
# generic RuntimeError after its load report; from_pretrained re-raises the first of ours instead
_errors = threading.local()


def record_error(error: Exception) -> bool:
    """Keep one of our errors for from_pretrained to re-raise; False (and a no-op) outside
    from_pretrained."""
    pending = getattr(_errors, "pending", None)
    if pending is not None:
        pending.append(error)
    return pending is not None


def _any4_metadata_names(metadata) -> list:
    import json

    names = []
    for key, value in (metadata or {}).items():
        if isinstance(value, str) and '"Any4Tensor"' in value:
            try:
                if json.loads(value).get("_type") == "Any4Tensor":
                    names.append(key)
            except (ValueError, AttributeError):
                continue
    return names


def _patch_save_metadata(quantizer_cls) -> None:
    """Checksums of the Any4Tensor parts and their metadata in every safetensors shard's header."""
    import json

    from any4ao.validation import ALGORITHM_KEY, CHECKSUM_ALGORITHM, CHECKSUM_KEY, checksums

    original = quantizer_cls.get_state_dict_and_metadata

    def get_state_dict_and_metadata(self, model, *args, **kwargs):
        state, metadata = original(self, model, *args, **kwargs)
        names = _any4_metadata_names(metadata)
        if names:
            prefixes = tuple(f"{n.rpartition('.')[0]}._{n.rpartition('.')[2]}_" for n in names)
            parts = {k: v for k, v in state.items() if k.startswith(prefixes)}
            metadata = dict(metadata)
            metadata[ALGORITHM_KEY] = CHECKSUM_ALGORITHM
            metadata[CHECKSUM_KEY] = json.dumps(checksums(parts, metadata, names))
        return state, metadata

    quantizer_cls.get_state_dict_and_metadata = get_state_dict_and_metadata


def _patch_set_metadata(quantizer_cls) -> None:
    """Remember the checkpoint files (for error messages) and name the file safetensors cannot read."""
    original = getattr(quantizer_cls, "set_metadata", None)
    if original is None:
        return

    def set_metadata(self, checkpoint_files, *args, **kwargs):
        self._any4ao_files = list(checkpoint_files or [])
        from safetensors import safe_open

        from any4ao.validation import CheckpointError

        for f in self._any4ao_files:
            if str(f).endswith(".safetensors"):
                try:
                    with safe_open(str(f), framework="pt") as handle:
                        handle.metadata()
                except Exception as e:
                    raise CheckpointError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e})") from None
        return original(self, checkpoint_files, *args, **kwargs)

    quantizer_cls.set_metadata = set_metadata


def _where(hf_quantizer) -> str:
    files = getattr(hf_quantizer, "_any4ao_files", None) or []
    if len(files) == 1:
        return str(files[0])
    if files:
        return f"{os.path.dirname(str(files[0]))} ({len(files)} safetensors shards)"
    return "checkpoint"


def _patch_deserialize() -> None:
    """Validate every Any4Tensor transformers rebuilds from a checkpoint (checksums, values), and
    name the weight and file in any error raised while rebuilding one."""
    import json

    import torch

    try:
        from transformers.integrations.torchao import TorchAoDeserialize
    except ImportError:
        return
    from any4ao.tensor.any4_tensor import Any4Tensor
    from any4ao.validation import CHECKSUM_KEY, ChecksumError, InvalidAny4TensorError, verify_checksums

    original = TorchAoDeserialize.convert

    def convert(self, input_dict, *args, **kwargs):
        full = kwargs.get("full_layer_name") or (args[2] if len(args) > 2 else None)
        metadata = getattr(self.hf_quantizer, "metadata", None) or {}
        where = _where(self.hf_quantizer)
        # an Any4Tensor by its metadata entry, or (entry deleted) by its parts' names
        any4 = '"Any4Tensor"' in str(metadata.get(full)) or any(str(k).endswith("_lut") for k in input_dict)
        try:
            out = original(self, input_dict, *args, **kwargs)
        except Exception as e:
            if not any4:
                raise
            error = e if isinstance(e, ValueError) and where in str(e) else None
            if error is None:
                parts = sorted(str(k) for k in input_dict)
                entry = "" if full in metadata else "; the file has no metadata entry for it (edited file?)"
                error = InvalidAny4TensorError(
                    f"{where}: weight {full!r} cannot be rebuilt from the parts {parts} (an Any4Tensor has "
                    f"{[f'_weight_{p}' for p in Any4Tensor.tensor_data_names]}){entry}: {str(e) or type(e).__name__}"
                )
            record_error(error)
            raise error from e
        try:
            _validate(out, input_dict, metadata, where)
        except ValueError as e:
            record_error(e)
            raise
        return out

    def _validate(out, input_dict, metadata, where):
        for name, value in out.items():
            if not isinstance(value, Any4Tensor):
                continue
            layer = name.rpartition(".")[0]
            if VERIFY_CHECKSUMS and CHECKSUM_KEY not in metadata:
                # save_pretrained always writes them with Any4Tensor weights: a file without is edited
                raise ChecksumError(
                    f"{where}: weight {name!r} is an Any4Tensor but the file holds no checksums (edited file?); "
                    + _SKIP_CHECKSUMS
                )
            if VERIFY_CHECKSUMS:
                parts = {}
                for suffix, tensors in input_dict.items():
                    t = tensors[0] if isinstance(tensors, (list, tuple)) else tensors
                    if isinstance(t, torch.Tensor):
                        parts[f"{layer}.{suffix}" if layer else suffix] = t
                try:
                    expected = json.loads(metadata[CHECKSUM_KEY])
                except ValueError:
                    raise ChecksumError(f"{where}: the checksum metadata is damaged") from None
                verify_checksums(parts, metadata, where, expected, meta_keys=[name], skip_hint=_SKIP_CHECKSUMS)
            try:
                value.validate_values()
            except InvalidAny4TensorError as e:
                raise InvalidAny4TensorError(f"{where}: weight {name!r}: {e}") from None

    TorchAoDeserialize.convert = convert


def _patch_quantize_on_load() -> None:
    """Quantize-on-load hands the handler a module, not its path: name it for the handler's errors
    (they said 'Linear(in_features=160, ...)', which fits every layer of that shape)."""
    try:
        from transformers.integrations.torchao import TorchAoQuantize
    except ImportError:
        return
    from any4ao.quantize_api import _NAMES

    original = TorchAoQuantize.convert

    def convert(self, input_dict, *args, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        full = kwargs.get("full_layer_name", args[1] if len(args) > 1 else None)
        module = None
        if isinstance(full, str) and model is not None:
            path = full.rpartition(".")[0]
            try:
                module = model.get_submodule(path)
            except AttributeError:
                module = None
            if module is not None:
                _NAMES[module] = path
        try:
            return original(self, input_dict, *args, **kwargs)
        finally:
            if module is not None:
                _NAMES.pop(module, None)

    TorchAoQuantize.convert = convert


def _patch_from_pretrained() -> None:
    """transformers turns errors raised while converting weights into a RuntimeError that names
    neither weight nor file (the details go to its logged load report): re-raise ours."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.from_pretrained.__func__
    if getattr(original, "_any4ao", False):
        return

    def from_pretrained(cls, *args, **kwargs):
        _check_no_calibration(kwargs.get("quantization_config"))
        outer = getattr(_errors, "pending", None) is None
        where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if outer:
            _errors.pending = []
        try:
            result = original(cls, *args, **kwargs)
            import torch

            dtype = _requested_dtype(kwargs.get("dtype", kwargs.get("torch_dtype")))
            model = result[0] if isinstance(result, tuple) else result  # output_loading_info=True
            if isinstance(model, torch.nn.Module):
                _check_something_quantized(model, kwargs.get("quantization_config"), where)
                _check_any4_files_loaded_as_any4(model, where, kwargs)
                if dtype is not None:
                    _cast_any4_weights(model, dtype, where)
                _freeze_any4_weights(model)
            return result
        except RuntimeError as e:
            pending = _errors.pending
            if outer and pending:
                raise pending[0] from e
            raise
        except ValueError as e:
            if str(e) == "Invalid torchao safetensors metadata":  # transformers' words: name file and entries
                from any4ao.validation import CheckpointError

                raise CheckpointError(f"{e}: {_explain_torchao_metadata(where, kwargs)}") from e
            raise
        finally:
            if outer:
                _errors.pending = None

    from_pretrained._any4ao = True
    from_pretrained.__doc__ = original.__doc__
    PreTrainedModel.from_pretrained = classmethod(from_pretrained)


def any4_configs_in(quant_type):
    """The Any4WeightOnlyConfigs a torchao config holds: itself, or every config of an FqnToConfig
    (what save_pretrained records for layers quantized differently); None if it holds another kind."""
    from any4ao.config import Any4WeightOnlyConfig

    if isinstance(quant_type, Any4WeightOnlyConfig):
        return [quant_type]
    if type(quant_type).__name__ == "FqnToConfig":
        configs = [c for c in quant_type.fqn_to_config.values() if c is not None]
        if configs and all(isinstance(c, Any4WeightOnlyConfig) for c in configs):
            return configs
    return None


def _without_calibration(quant_type):
    """quant_type with the calibration statistics of every Any4WeightOnlyConfig in it dropped."""
    from any4ao.config import Any4WeightOnlyConfig

    def drop(c):
        return dataclasses.replace(c, calibration=None) if isinstance(c, Any4WeightOnlyConfig) else c

    if type(quant_type).__name__ == "FqnToConfig":
        return type(quant_type)(
            type(quant_type.fqn_to_config)((k, drop(c)) for k, c in quant_type.fqn_to_config.items())
        )
    return drop(quant_type)


def _with_variant(name: str, variant) -> str:
    """transformers' naming of a variant's file: model.safetensors -> model.fp16.safetensors."""
    if not variant:
        return name
    parts = name.split(".")
    return ".".join(parts[:-1] + [variant, parts[-1]])


def _checkpoint_files(where, kwargs):
    """The safetensors files from_pretrained reads for a local checkpoint: model.safetensors or the
    shards its index names (with subfolder= and variant=); [] for hub ids. Not every file in the
    folder: a save_quantized file kept beside a float checkpoint is none of its weights."""
    import json
    from pathlib import Path

    path = Path(str(where))
    if path.is_file():
        return [path] if path.suffix == ".safetensors" else []
    base = path / (kwargs.get("subfolder") or "")
    if not base.is_dir():
        return []
    variant = kwargs.get("variant")
    index = base / _with_variant("model.safetensors.index.json", variant)
    if index.is_file():
        try:
            shards = json.loads(index.read_text())["weight_map"].values()
        except (OSError, ValueError, KeyError, AttributeError):
            return []
        return sorted({base / shard for shard in shards})
    single = base / _with_variant("model.safetensors", variant)
    return [single] if single.is_file() else []


def _local_safetensors_metadata(where, kwargs):
    """{file: its safetensors __metadata__ (None if the header is unreadable)} of the files
    from_pretrained reads (_checkpoint_files)."""
    from safetensors import safe_open

    found = {}
    for file in _checkpoint_files(where, kwargs):
        try:
            with safe_open(str(file), framework="pt") as handle:
                found[file] = handle.metadata() or {}
        except Exception:  # (safetensors' own error types vary by version)
            found[file] = None
    return found


def _explain_torchao_metadata(where, kwargs) -> str:
    """Which safetensors file of a local checkpoint lists tensors in its torchao metadata
    ("tensor_names") without an entry describing them, as torchao needs."""
    import json

    found = []
    for file, metadata in _local_safetensors_metadata(where, kwargs).items():
        try:
            names = json.loads(metadata.get("tensor_names", "[]"))
        except (AttributeError, TypeError, ValueError):
            found.append(f"{file}: unreadable header or tensor_names")
            continue
        lacking = [t for t in names if not isinstance(metadata.get(t), str)]
        if lacking:
            found.append(f"{file}: no metadata entry for {lacking[:5]} (edited file?)")
    return "; ".join(found) or f"{where}: no file with a missing entry found"


def _check_any4_files_loaded_as_any4(model, where, kwargs) -> None:
    """A checkpoint whose safetensors hold Any4Tensor weights, loaded without a torchao
    quantization_config (config.json replaced by the base model's, say), gives a model whose
    quantized linears are freshly random (transformers only warns of unexpected '_weight_*' keys):
    an error naming the file."""
    from any4ao.tensor.any4_tensor import Any4Tensor
    from any4ao.validation import CheckpointError

    if getattr(model.config, "quantization_config", None) is not None:
        return
    if any(isinstance(p, Any4Tensor) for p in model.parameters()):
        return
    for file, metadata in _local_safetensors_metadata(where, kwargs).items():
        if metadata and any('"Any4Tensor"' in v for v in metadata.values() if isinstance(v, str)):
            raise CheckpointError(
                f"{file} holds any4-quantized weights, but the model's config.json has no quantization_config, "
                "so they were not loaded (its linears are random): restore the quantization_config that "
                "save_pretrained wrote, or pass quantization_config=TorchAoConfig(quant_type=Any4WeightOnlyConfig(...))"
            )


def _check_no_calibration(quantization_config) -> None:
    """Calibration statistics name the layers of the model they were recorded on; the model
    from_pretrained builds is another one (and transformers serialises the config to JSON first,
    which failed with a bare TypeError)."""
    configs = any4_configs_in(getattr(quantization_config, "quant_type", None)) or []
    if any(c.calibration is not None for c in configs):
        raise ValueError(
            "from_pretrained: TorchAoConfig(quant_type=Any4WeightOnlyConfig(calibration=...)): the statistics "
            "belong to the model they were recorded on, not the one being loaded. Load the model first, then "
            "any4ao.quantize_model(model, config, tokenizer=tokenizer) (it calibrates on the loaded model)"
        )


def _requested_dtype(dtype):
    """The one torch.dtype a from_pretrained dtype argument asks for: a torch.dtype, its name
    ("bfloat16", "torch.float16"), or a dict whose values all name the same dtype; None for
    "auto", None, or a dict of several dtypes (then the Any4Tensors keep the stored dtype)."""
    import torch

    if isinstance(dtype, dict):
        found = {_requested_dtype(v) for v in dtype.values()}
        return found.pop() if len(found) == 1 else None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _check_something_quantized(model, quantization_config, where) -> None:
    """Quantize-on-load with an Any4WeightOnlyConfig that selected no layer (GPT-2: its Conv1D
    layers are no nn.Linear) left a float model, silently: an error, as quantize_model's."""
    from any4ao.quantize_api import nothing_quantized_error
    from any4ao.tensor.any4_tensor import Any4Tensor

    if any4_configs_in(getattr(quantization_config, "quant_type", None)) is None:
        return
    if not any(isinstance(p, Any4Tensor) for p in model.parameters()):
        raise nothing_quantized_error(
            model,
            f"{where}: quantization_config asks for any4 but no layer of the {type(model).__name__} was "
            "quantized (torchao quantizes nn.Linear layers)",
        )


def _freeze_any4_weights(model) -> None:
    """transformers rebuilds loaded Any4Tensor parameters with requires_grad=True; they get no
    gradient (the packed codes are frozen), so say so in their flag, as quantize_ does."""
    from any4ao.tensor.any4_tensor import Any4Tensor

    for param in model.parameters():
        if isinstance(param, Any4Tensor) and param.requires_grad:
            param.requires_grad_(False)


def _cast_any4_weights(model, dtype, where) -> None:
    """from_pretrained(..., dtype=d) loads every plain weight in d, but the Any4Tensors keep the
    dtype they were saved in (transformers rebuilds them as stored): cast them too, as
    load_state_dict would, or the first forward fails on mismatched dtypes. All or nothing: every
    cast is made before any parameter is replaced; a cast that would overflow (fp32 scales beyond
    fp16) names the weight."""
    import torch

    from any4ao.tensor.any4_tensor import Any4Tensor

    casts, done = [], {}
    for module_name, module in model.named_modules():
        for attr, param in module._parameters.items():
            if not isinstance(param, Any4Tensor) or param.dtype == dtype:
                continue
            if id(param) not in done:  # tied weights: one cast, one parameter
                try:
                    done[id(param)] = torch.nn.Parameter(param.to(dtype), requires_grad=False)
                except ValueError as e:
                    name = f"{module_name}.{attr}" if module_name else attr
                    # (the load fails whole: without NarrowingError's note on model.to())
                    raise ValueError(
                        f"{where}: weight {name!r} cannot be cast to {dtype}: {getattr(e, 'reason', e)}"
                    ) from None
            casts.append((module, attr, done[id(param)]))
    for module, attr, new in casts:
        module._parameters[attr] = new


def _any4_config_for_save(model):
    """What config.json records for a model quantized outside transformers: the Any4WeightOnlyConfig
    of its quantized layers (the one quantize_model / quantize_ used, calibration dropped, else one
    read off the tensors), or, where layers were quantized differently, a torchao FqnToConfig giving
    each layer its own."""
    from collections import OrderedDict

    from torchao.quantization import FqnToConfig

    from any4ao.quantize_api import CONFIG_OF
    from any4ao.tensor.any4_tensor import Any4Tensor

    per_layer = OrderedDict()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, Any4Tensor):
            recorded = CONFIG_OF.get(module)
            per_layer[name] = (
                dataclasses.replace(recorded, calibration=None) if recorded is not None else _config_read_off(weight)
            )
    distinct = []
    for config in per_layer.values():
        if config not in distinct:
            distinct.append(config)
    if not distinct:  # Any4Tensors under other parameter names than weight (not quantize_'s): one config
        return _config_read_off(next(p for p in model.parameters() if isinstance(p, Any4Tensor)))
    return distinct[0] if len(distinct) == 1 else FqnToConfig(per_layer)


def _config_read_off(weight):
    """An Any4WeightOnlyConfig matching a tensor whose own config is not known (a copied or loaded
    model: CONFIG_OF knows only the quantized originals); the LUT tells a fixed grid."""
    from any4ao.codebooks.fixed import fixed_codebook_of
    from any4ao.config import Any4WeightOnlyConfig

    codebook = fixed_codebook_of(weight.lut, weight.nbits) or f"any{weight.nbits}"
    return Any4WeightOnlyConfig(
        codebook=codebook, group_size=weight.group_size, kernel_preference=weight.kernel_preference
    )


def _is_torchao_deserialize(conversion) -> bool:
    return any(type(op).__name__ == "TorchAoDeserialize" for op in getattr(conversion, "operations", ()))


def _check_ties_as_configured(model) -> None:
    """TorchAoConfig(untie_embedding_weights=True) sets tie_word_embeddings=False but, where neither
    is quantized, leaves lm_head and the input embeddings one parameter (transformers 5.25, with any
    torchao config): the save then writes the embeddings only and the load builds a random lm_head."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    text = model.config.get_text_config(decoder=True)
    shared = emb is not None and head is not None and getattr(head, "weight", None) is getattr(emb, "weight", 1)
    if shared and getattr(text, "tie_word_embeddings", True) is False:
        raise ValueError(
            "save_pretrained: the config says tie_word_embeddings=False (TorchAoConfig(untie_embedding_weights="
            "True)), but the output and input embeddings are still one parameter, so the file would hold no "
            "lm_head and a load would initialise it at random; untie them first: "
            "model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())"
        )


def _prepare_save(model):
    """Make `model.save_pretrained` store its Any4Tensor weights, or raise before anything is
    written. Returns a function that undoes the temporary changes."""
    from transformers import TorchAoConfig
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    from any4ao.tensor.any4_tensor import Any4Tensor

    quantized = {n for n, p in model.named_parameters() if isinstance(p, Any4Tensor)}
    if not quantized:
        return lambda: None
    if any(p.ndim != 2 for n, p in model.named_parameters() if n in quantized):
        raise ValueError("save_pretrained: Any4Tensor weights are sharded (FSDP); gather a full state dict first")
    _check_ties_as_configured(model)
    hf_quantizer = getattr(model, "hf_quantizer", None)
    keys = ("hf_quantizer", "is_quantized", "quantization_method", "_weight_conversions")
    saved = {k: getattr(model, k) for k in keys if k in vars(model)}
    saved_config = getattr(model.config, "quantization_config", None)
    had_config = "quantization_config" in vars(model.config)
    conversions = saved.get("_weight_conversions")
    if conversions:
        # A model loaded from a torchao checkpoint remembers the step that rebuilt its tensors from the
        # file's parts (TorchAoDeserialize); save_pretrained asks every step for its inverse, which that
        # one lacks (NotImplementedError after config.json is written). The quantizer writes the parts
        # itself, so the save goes without that step.
        model._weight_conversions = [c for c in conversions if not _is_torchao_deserialize(c)]

    def restore():
        for k in keys:
            if k in saved:
                setattr(model, k, saved[k])
            elif k in vars(model):
                delattr(model, k)
        if had_config:
            model.config.quantization_config = saved_config
        elif "quantization_config" in vars(model.config):
            del model.config.quantization_config

    if isinstance(hf_quantizer, TorchAoHfQuantizer):
        quant_type = hf_quantizer.quantization_config.quant_type
        if any4_configs_in(quant_type) is None:
            raise ValueError(
                f"save_pretrained: the model holds Any4Tensor weights but its torchao quantization config is "
                f"{type(quant_type).__name__}; save it with any4ao.save_quantized instead"
            )
        # statistics of one run: not serialisable, not needed to load
        hf_quantizer.quantization_config.quant_type = _without_calibration(quant_type)
        return restore
    method = getattr(getattr(hf_quantizer, "quantization_config", None), "quant_method", None)
    method = getattr(method, "value", method)
    if hf_quantizer is not None and method != "gguf":
        raise ValueError(
            f"save_pretrained: the model holds Any4Tensor weights and is also quantized with {method}; "
            "transformers cannot save both: save it with any4ao.save_quantized instead"
        )
    # quantized by quantize_model / quantize_ (or after a GGUF load, whose weights are dense now):
    # a torchao quantizer for the save, with every non-quantized linear listed as not converted
    from torch import nn

    skip = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and f"{n}.weight" not in quantized]
    config = TorchAoConfig(quant_type=_any4_config_for_save(model), modules_to_not_convert=skip)
    model.hf_quantizer = TorchAoHfQuantizer(config)
    model.config.quantization_config = config
    model.is_quantized = True
    model.quantization_method = config.quant_method
    return restore


def _patch_save_pretrained() -> None:
    from transformers import PreTrainedModel

    original = PreTrainedModel.save_pretrained
    if getattr(original, "_any4ao", False):
        return

    def save_pretrained(self, *args, **kwargs):
        restore = _prepare_save(self)
        try:
            return original(self, *args, **kwargs)
        finally:
            restore()

    save_pretrained._any4ao = True
    save_pretrained.__doc__ = original.__doc__
    PreTrainedModel.save_pretrained = save_pretrained


def register_with_transformers() -> None:
    """Idempotent; warns (and leaves transformers alone) if its quantizer looks like neither shape."""
    global _registered
    if _registered:
        return
    try:
        from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer
    except ImportError:  # transformers without torchao support: nothing to extend
        return
    names = getattr(TorchAoHfQuantizer, "serialized_names", None)
    if isinstance(names, property):
        _patch_serialized_names(TorchAoHfQuantizer, names)
    elif "get_weight_conversions" in vars(TorchAoHfQuantizer):
        _patch_weight_conversions(TorchAoHfQuantizer)
    else:
        warnings.warn(
            "any4ao: transformers' TorchAoHfQuantizer has neither serialized_names nor its own "
            "get_weight_conversions; from_pretrained of any4 checkpoints will not work with this "
            "transformers version (save_quantized/load_quantized still do)"
        )
        return
    _patch_save_metadata(TorchAoHfQuantizer)
    _patch_set_metadata(TorchAoHfQuantizer)
    _patch_deserialize()
    _patch_quantize_on_load()
    _patch_save_pretrained()
    _patch_from_pretrained()
    _registered = True
