"""Put Any4Tensor and Any4WeightOnlyConfig on torchao's serialization allow-lists.

torchao rebuilds tensor subclasses and configs from JSON metadata only for classes it knows by
name (a guard against loading arbitrary code). Registering ours is what makes
`torchao.prototype.safetensors` and transformers' `TorchAoConfig(quant_type=Any4WeightOnlyConfig(...))`
save and reload any4 models.
"""

_registered = False


def register_with_torchao() -> None:
    """Idempotent."""
    global _registered
    if _registered:
        return
    import torchao.core.config as ao_config
    import torchao.prototype.safetensors.safetensors_utils as ao_safetensors

    from any4ao.tensor.any4_tensor import Any4Tensor

    ao_config.ALLOWED_AO_MODULES.add("any4ao")  # config_from_dict looks classes up in these modules
    if not getattr(ao_config.config_from_dict, "_any4ao", False):
        ao_config.config_from_dict = _reading_old_enum_names(ao_config.config_from_dict)
    ao_safetensors.ALLOWED_CLASSES.setdefault("Any4Tensor", Any4Tensor)
    if "Any4Tensor" not in ao_safetensors.ALLOWED_TENSORS_SUBCLASSES:
        ao_safetensors.ALLOWED_TENSORS_SUBCLASSES.append("Any4Tensor")
    _registered = True


def _reading_old_enum_names(config_from_dict):
    """config_from_dict that reads Any4WeightOnlyConfig dicts written before the enum was renamed
    (kernel_preference saved as "KernelPreference"). torchao looks a name up in a *set* of modules,
    so in some processes it found its own KernelPreference (no DEQUANTIZE) and the load failed at
    random with the hash seed; the old name is read as Any4KernelPreference. transformers imports
    config_from_dict from torchao.core.config at call time, and torchao's recursion looks the
    module-level name up, so both come through here."""

    def read(data, *args, **kwargs):
        if (
            isinstance(data, dict)
            and data.get("_type") == "Any4WeightOnlyConfig"
            and isinstance(data.get("_data"), dict)
        ):
            pref = data["_data"].get("kernel_preference")
            if isinstance(pref, dict) and pref.get("_type") == "KernelPreference":
                data = {
                    **data,
                    "_data": {**data["_data"], "kernel_preference": {**pref, "_type": "Any4KernelPreference"}},
                }
        return config_from_dict(data, *args, **kwargs)

    read._any4ao = True
    read.__doc__ = config_from_dict.__doc__
    return read
