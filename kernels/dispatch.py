"""Which path a matmul with an Any4Tensor weight takes."""

import torch


def triton_linear_applies(x: torch.Tensor, weight) -> bool:
    """The fused Triton kernels run on CUDA tensors; everything else dequantizes."""
    return False
