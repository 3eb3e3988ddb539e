"""Triton LUT kernels for Any4Tensor (installed as the subpackage `any4ao.kernels`)."""
