"""any4ao: learned 4-bit LUT weight quantization (any4) as a torchao tensor subclass."""

from any4ao._kernels_path import ensure_kernels_importable

ensure_kernels_importable()

from any4ao.tensor.any4_tensor import Any4Tensor  # noqa: E402
from any4ao.config import Any4WeightOnlyConfig, any4, any4_weight_only  # noqa: E402
from any4ao.calibration.activation_stats import (  # noqa: E402
    ChannelImportance,
    calibrate,
    default_calibration_text,
    record_channel_importance,
)
from any4ao.api import default_filter, quantize_model  # noqa: E402
from any4ao.serialization import load_quantized, save_quantized  # noqa: E402
from any4ao.integrations import (  # noqa: E402
    register_with_torchao,
    register_with_transformers,
    register_with_transformers_when_imported,
)

register_with_torchao()
register_with_transformers_when_imported()  # now, or when transformers loads its torchao quantizer

__all__ = [
    "Any4Tensor",
    "Any4WeightOnlyConfig",
    "any4",
    "any4_weight_only",
    "ChannelImportance",
    "calibrate",
    "default_calibration_text",
    "record_channel_importance",
    "default_filter",
    "quantize_model",
    "save_quantized",
    "load_quantized",
]
__version__ = "0.1.0"
