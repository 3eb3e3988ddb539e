"""The Any4Tensor subclass, its bit packing and the aten ops it implements."""

from any4ao.tensor import ops as _ops  # noqa: F401  (registers Any4Tensor's aten ops)
from any4ao.tensor.any4_tensor import Any4Tensor

__all__ = ["Any4Tensor"]
