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
    ao_safetensors.ALLOWED_CLASSES.setdefault("Any4Tensor", Any4Tensor)
    if "Any4Tensor" not in ao_safetensors.ALLOWED_TENSORS_SUBCLASSES:
        ao_safetensors.ALLOWED_TENSORS_SUBCLASSES.append("Any4Tensor")
    _registered = True
