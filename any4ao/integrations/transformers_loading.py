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

import warnings

EXTRA_SUFFIXES = ("lut", "scales", "zeros")
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
