"""any4ao: learned 4-bit LUT weight quantization (any4) as a torchao tensor subclass."""

from any4ao import cli_noise as _cli_noise

if _cli_noise.invoked_as_cli() and not _cli_noise.debugging():  # before torchao's import logs
    _cli_noise.silence_import_noise()


from any4ao.calibration.activation_stats import (
    ChannelImportance,
    calibrate,
    default_calibration_text,
    random_token_ids,
    record_channel_importance,
)
from any4ao.config import (
    Any4KernelPreference,
    Any4WeightOnlyConfig,
    Codebook,
    ErrorFeedback,
    KernelPreference,
    Scaling,
    any4_weight_only,
)
from any4ao.integrations import register_with_torchao, register_with_transformers
from any4ao.integrations import transformers_loading as _transformers_loading
from any4ao.quantize_api import LayerError, default_filter, quantize_model
from any4ao.serialization import load_quantized, save_quantized
from any4ao.tensor import Any4Tensor
from any4ao.validation import CheckpointError, ChecksumError, InvalidAny4TensorError

register_with_torchao()
_transformers_loading.register_when_transformers_loads()

__all__ = [
    "Any4KernelPreference",
    "Any4Tensor",
    "Any4WeightOnlyConfig",
    "Codebook",
    "ErrorFeedback",
    "KernelPreference",
    "Scaling",
    "any4_weight_only",
    "ChannelImportance",
    "calibrate",
    "default_calibration_text",
    "random_token_ids",
    "record_channel_importance",
    "LayerError",
    "default_filter",
    "quantize_model",
    "save_quantized",
    "load_quantized",
    "CheckpointError",
    "ChecksumError",
    "InvalidAny4TensorError",
    "register_with_torchao",
    "register_with_transformers",
]
__version__ = "0.2.0"
