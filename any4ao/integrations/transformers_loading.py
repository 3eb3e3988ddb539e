"""Let transformers' torchao quantizer load Any4Tensor checkpoints.

When loading a pre-quantized torchao checkpoint, transformers gathers the flattened parts of each
quantized weight by a fixed list of suffixes (`_weight_qdata`, `_weight_scale`,
`_weight_zero_point`, ...). Any4Tensor's parts are `qdata`, `lut`, `scale`, `zero_point`; this adds
`lut` to that list, so `AutoModelForCausalLM.from_pretrained(path)` rebuilds the Any4Tensor weights
without re-quantizing.

When: every HF flow builds an Any4WeightOnlyConfig after importing transformers (the user's
`TorchAoConfig(quant_type=Any4WeightOnlyConfig())`, or transformers parsing a checkpoint's
config.json), so the config calls `register_with_transformers_if_loaded()`. `import any4ao` alone
never imports transformers; `register_with_transformers()` can also be called explicitly.

Two shapes of transformers are handled (both verified by tests/test_serialization.py):
  - newer releases (5.23+) list the suffixes in the quantizer's `serialized_names` property;
  - older 5.x releases (5.17) build `WeightConverter(source_patterns=[...])` objects in
    `get_weight_conversions()`; those converters are rebuilt with the extra suffix.
"""

import sys
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
    _registered = True
