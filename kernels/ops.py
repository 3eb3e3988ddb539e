"""`torch.library` custom ops over the Triton kernels, so torch.compile(fullgraph=True) takes
them without a graph break and CUDA graphs capture them.

lut_linear is an opaque custom op (with a fake implementation) rather than a triton_op: its body
picks a kernel by M, and a traced body would turn those choices into guards, i.e. a recompile
each time the token count crosses a threshold (seen on the H100: 3 graphs for 4 prompt lengths).
Opaque, one graph serves every length. dequantize has no such branch and stays a triton_op.
"""

import torch
from torch.library import triton_op

from any4ao.kernels.launch import dequantize_then_mm, lut_dequantize, lut_matmul

# From this many rows of x on, dequantizing W once (one pass, 2.0-2.5 TB/s on an H100) and calling
# cuBLAS beats the fused kernel. H100, 4096x4096 / 28672x4096 / 8192x8192 (sweep-H100-v11-mma-spread.json):
# at M=64 lut_mma (8 n-tiles) took 23.7 / 157.4 / 80.8 us against 27.7 / 219.7 / 120.9 for dequantize
# + cuBLAS; at M=128 (two programs along M, each looking the weights up again) its best configs took
# 36.8 / 238.2 / 168.0 against 29.8 / 224.3 / 122.6. Two row tiles per warp (sweep v13b) brought M=64
# to 23.6 / 136.5 / 72.1 us; M=128 was not re-measured with them.
DEQUANT_THEN_MM_MIN_M = 65


# Defined with torch.library.define + impl rather than @custom_op: custom_op wraps every call in
# Python checks (output aliasing and more) that cost about 70 us of host time per call on the H100
# machine (167 against 95 us per M=1 4096x4096 call, benchmarks/bench_op_overhead.py), several times
# the decode kernel's GPU time, paid on every linear of an eager or compiled (non-CUDA-graph) model. The op is still opaque to
# torch.compile, with the same fake and autograd registrations.
torch.library.define(
    "any4ao::lut_linear",
    "(Tensor x, Tensor qdata, Tensor lut, Tensor scales, Tensor zeros, int nbits, int group_size) -> Tensor",
)


@torch.library.impl("any4ao::lut_linear", "CompositeExplicitAutograd")
def lut_linear(
    x: torch.Tensor, qdata: torch.Tensor, lut: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    nbits: int, group_size: int,
) -> torch.Tensor:
    """x (M, K) @ W^T -> (M, N) in x's dtype."""
    if x.shape[0] >= DEQUANT_THEN_MM_MIN_M:
        return dequantize_then_mm(x, qdata, lut, scales, zeros, nbits, group_size)
    return lut_matmul(x, qdata, lut, scales, zeros, nbits, group_size)


@torch.library.register_fake("any4ao::lut_linear")
def _(x, qdata, lut, scales, zeros, nbits, group_size):
    return x.new_empty(x.shape[0], qdata.shape[0])


def _lut_linear_setup_context(ctx, inputs, output):
    x, qdata, lut, scales, zeros, nbits, group_size = inputs
    ctx.save_for_backward(qdata, lut, scales, zeros)
    ctx.nbits, ctx.group_size, ctx.in_features = nbits, group_size, x.shape[1]


def _lut_linear_backward(ctx, grad_out):
    """QLoRA-style: the weight is frozen, so only x gets a gradient, grad_x = grad_out @ W
    (W dequantized by the Triton kernel, then one matmul)."""
    qdata, lut, scales, zeros = ctx.saved_tensors
    w = torch.ops.any4ao.dequantize(qdata, lut, scales, zeros, ctx.nbits, ctx.group_size, ctx.in_features,
                                    grad_out.dtype)
    return grad_out @ w, None, None, None, None, None, None


torch.library.register_autograd("any4ao::lut_linear", _lut_linear_backward, setup_context=_lut_linear_setup_context)


@triton_op("any4ao::dequantize", mutates_args=())
def dequantize(
    qdata: torch.Tensor, lut: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    nbits: int, group_size: int, in_features: int, dtype: torch.dtype,
) -> torch.Tensor:
    return lut_dequantize(qdata, lut, scales, zeros, nbits, group_size, in_features, dtype)
