"""Let transformers' torchao quantizer load Any4Tensor checkpoints.

When loading a pre-quantized torchao checkpoint, transformers gathers the flattened parts of each
quantized weight by a fixed list of suffixes (`_weight_qdata`, `_weight_scale`, ...). Any4Tensor's
parts are `qdata`, `lut`, `scales`, `zeros`; this adds the last three to that list, so
`AutoModelForCausalLM.from_pretrained(path)` rebuilds the Any4Tensor weights without re-quantizing.

Two shapes of transformers are handled (both verified by tests/test_serialization.py):
  - newer releases (5.23) list the suffixes in the quantizer's `serialized_names` property;
  - older 5.x releases (5.17) build `WeightConverter(source_patterns=[...])` objects in
    `get_weight_conversions()`; those converters are rebuilt with the extra suffixes.
"""

import importlib.abc
import sys
import warnings

EXTRA_SUFFIXES = ("lut", "scales", "zeros")
QUANTIZER_MODULE = "transformers.quantizers.quantizer_torchao"
_registered = False


def _with_extra_names(names):
    return {param: list(parts) + [f"_{param}_{s}" for s in EXTRA_SUFFIXES if f"_{param}_{s}" not in parts]
            for param, parts in names.items()}


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
                # first: patterns match as unanchored regexes in list order, so the built-in
                # "_weight_scale" would otherwise swallow "_weight_scales" (leaving a stray "weights" key)
                sources = extra + [p for p in conv.source_patterns if p not in extra]
                conv = WeightConverter(source_patterns=sources, target_patterns=targets, operations=conv.operations)
            converters.append(conv)
        return converters

    quantizer_cls.get_weight_conversions = get_weight_conversions


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Runs register_with_transformers right after transformers' torchao quantizer module executes,
    so `import any4ao` does not import transformers (about 1.5 s) for users who never touch it."""

    def find_spec(self, name, path, target=None):
        if name != QUANTIZER_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _remove_hook()
        register_with_transformers()


_hook = _RegisterOnImport()


def _remove_hook() -> None:
    if _hook in sys.meta_path:
        sys.meta_path.remove(_hook)


def register_with_transformers_when_imported() -> None:
    """Register now if transformers' torchao quantizer is already loaded, else on its import."""
    if QUANTIZER_MODULE in sys.modules:
        register_with_transformers()
    elif not _registered and _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)


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
        warnings.warn("any4ao: transformers' TorchAoHfQuantizer has neither serialized_names nor its own "
                      "get_weight_conversions; from_pretrained of any4 checkpoints will not work with this "
                      "transformers version (save_quantized/load_quantized still do)")
        return
    _registered = True
