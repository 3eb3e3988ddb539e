"""`torch.library` custom ops over the Triton kernels, so torch.compile(fullgraph=True) takes them
without a graph break and CUDA graphs capture them.

lut_linear is an opaque op (with a fake implementation) rather than a triton_op: its body picks a
kernel by M (selector.py), and a traced body would turn those choices into guards, i.e. a
recompile each time the token count crosses a threshold (seen on the H100: 3 graphs for 4 prompt
lengths). Opaque, one graph serves every length. dequantize has no such branch and is a triton_op.

lut_linear is defined with torch.library.define + impl rather than @custom_op: custom_op wraps
every call in Python checks that cost about 70 us of host time per call on the H100 machine
(167 against 95 us per M=1 4096x4096 call, benchmarks/bench_op_overhead.py), several times the
decode kernel's GPU time. The op is still opaque to torch.compile, with the same fake and autograd
registrations.
"""

import torch
from torch.library import triton_op

from any4ao.kernels.launch import dequantize_then_mm, lut_dequantize, lut_mma
from any4ao.kernels.selector import choose

torch.library.define(
    "any4ao::lut_linear",
    "(Tensor x, Tensor qdata, Tensor lut, Tensor scale, Tensor zero_point, int nbits, int group_size) -> Tensor",
)


@torch.library.impl("any4ao::lut_linear", "CompositeExplicitAutograd")
def lut_linear(
    x: torch.Tensor,
    qdata: torch.Tensor,
    lut: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    nbits: int,
    group_size: int,
) -> torch.Tensor:
    """x (M, K) @ W^T -> (M, N) in x's dtype."""
    x = x.contiguous()
    config = choose(x, qdata, lut, scale, zero_point, nbits, group_size)
    if config is None:
        return dequantize_then_mm(x, qdata, lut, scale, zero_point, nbits, group_size)
    return lut_mma(x, qdata, lut, scale, zero_point, nbits, group_size, config)


@torch.library.register_fake("any4ao::lut_linear")
def _(x, qdata, lut, scale, zero_point, nbits, group_size):
    return x.new_empty(x.shape[0], qdata.shape[0])


def _lut_linear_setup_context(ctx, inputs, output):
    x, qdata, lut, scale, zero_point, nbits, group_size = inputs
    ctx.save_for_backward(qdata, lut, scale, zero_point)
    ctx.nbits, ctx.group_size, ctx.in_features = nbits, group_size, x.shape[1]


def _lut_linear_backward(ctx, grad_out):
    """QLoRA-style: the weight is frozen, so only x gets a gradient, grad_x = grad_out @ W
    (W dequantized by the Triton kernel, then one matmul)."""
    qdata, lut, scale, zero_point = ctx.saved_tensors
    w = torch.ops.any4ao.dequantize(
        qdata, lut, scale, zero_point, ctx.nbits, ctx.group_size, ctx.in_features, grad_out.dtype
    )
    return grad_out @ w, None, None, None, None, None, None


torch.library.register_autograd("any4ao::lut_linear", _lut_linear_backward, setup_context=_lut_linear_setup_context)


@triton_op("any4ao::dequantize", mutates_args=())
def dequantize(
    qdata: torch.Tensor,
    lut: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    nbits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    return lut_dequantize(qdata, lut, scale, zero_point, nbits, group_size, in_features, dtype)
