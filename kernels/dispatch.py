"""Which path a matmul with an Any4Tensor weight takes."""

import functools

import torch


@functools.lru_cache(maxsize=1)
def kernels_loaded() -> bool:
    try:
        import triton  # noqa: F401

        import any4ao.kernels.ops  # noqa: F401  (registers torch.ops.any4ao.*)
    except ImportError:
        return False
    return True


def triton_linear_applies(x: torch.Tensor, weight) -> bool:
    """The fused Triton kernels run on CUDA with 16-bit activations; everything else (CPU, fp32)
    takes dequantize + F.linear."""
    return (
        x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and not weight.transposed
        and kernels_loaded()
    )
