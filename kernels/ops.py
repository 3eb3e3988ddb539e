"""`torch.library` custom ops over the Triton kernels, so torch.compile(fullgraph=True) takes them
without a graph break and CUDA graphs capture them.

lut_linear is an opaque op (with a fake implementation) rather than a triton_op: its body picks a
kernel by M (selector.py), and a traced body would turn those choices into guards, i.e. a
recompile each time the token count crosses a threshold (seen on the H100: 3 graphs for 4 prompt
lengths). Opaque, one graph serves every length. dequantize has no such branch and is a triton_op.

lut_linear is defined with torch.library.define + impl rather than @custom_op: custom_op wraps
every call in Python checks that cost about 70 us of host time per call on the H100 machine
(167 against 95 us per M=1 4096x4096 call, with a script since removed; benchmarks/profile_eager.py
measures host time per call now), several times the decode kernel's GPU time. The op is still opaque to torch.compile, with the same fake and autograd
registrations.
"""

import warnings

import torch
from torch.library import triton_op

from any4ao.kernels.launch import INTERPRET, dequantize_then_mm, lut_dequantize, lut_gemm, lut_gemm_ws, lut_mma
from any4ao.kernels.selector import GemmConfig, WsConfig, choose

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _check(op: str, qdata, lut, scale, zero_point, nbits, group_size, in_features, x=None) -> None:
    """The arguments describe one packed weight (and x fits it): ValueError otherwise. Shapes,
    dtypes, devices and ints only, no data: it runs on every call and on fake tensors under
    torch.compile. One boolean expression on the good path (about 4 us of host time on this 2-core
    CPU, against 95 us for a whole lut_linear call on the H100 host); `_explain` names the problem."""
    qs = qdata.shape
    n = qs[0]
    dev = qdata.get_device()  # an int (-1: CPU): cheaper to compare than torch.device objects
    if (
        type(nbits) is int
        and 2 <= nbits <= 4
        and type(group_size) is int
        and group_size > 0
        and group_size % 16 == 0
        and qdata.dtype is torch.uint8
        and len(qs) == 2
        and qs[1] == -(-in_features // (4 if nbits == 2 else 2))
        and lut.shape == (n, 1 << nbits)
        and scale.shape == (n, -(-in_features // group_size))
        and zero_point.shape == scale.shape
        and lut.dtype in _FLOATS
        and scale.dtype in _FLOATS
        and zero_point.dtype is scale.dtype
        and lut.get_device() == dev
        and scale.get_device() == dev
        and zero_point.get_device() == dev
        and lut.is_contiguous()
        and (qdata.is_contiguous() or qdata.stride(1) == 1)
        and (scale.is_contiguous() or scale.stride(1) == 1)
        and (zero_point.is_contiguous() or zero_point.stride(1) == 1)
        and (n < 2 or zero_point.stride(0) == scale.stride(0))  # the kernels read both with one row stride
        and (x is None or (x.dim() == 2 and x.dtype in _FLOATS and x.get_device() == dev))
    ):
        return
    _explain(op, qdata, lut, scale, zero_point, nbits, group_size, in_features, x)
    raise ValueError(f"any4ao.{op}: inconsistent arguments")  # (_explain raises first)


def _explain(op: str, qdata, lut, scale, zero_point, nbits, group_size, in_features, x=None) -> None:
    if nbits not in (2, 3, 4) or type(nbits) is not int:
        raise ValueError(f"any4ao.{op}: nbits={nbits!r}, expected 2, 3 or 4")
    if type(group_size) is not int or group_size <= 0 or group_size % 16:
        raise ValueError(f"any4ao.{op}: group_size={group_size!r}, expected a positive multiple of 16")
    if qdata.dtype != torch.uint8 or qdata.dim() != 2:
        raise ValueError(f"any4ao.{op}: qdata must be 2-D uint8, got {qdata.dtype} {tuple(qdata.shape)}")
    n, k = qdata.shape[0], in_features
    width = -(-k // (4 if nbits == 2 else 2))
    groups = -(-k // group_size)
    if qdata.shape[1] != width:
        raise ValueError(
            f"any4ao.{op}: qdata {tuple(qdata.shape)} packs {qdata.shape[1]} bytes per row, but in_features={k} "
            f"at nbits={nbits} needs {width}" + (" (x's last dimension)" if x is not None else "")
        )
    for name, t, want in (
        ("lut", lut, (n, 1 << nbits)),
        ("scale", scale, (n, groups)),
        ("zero_point", zero_point, (n, groups)),
    ):
        if t.dim() != 2 or t.shape[0] != want[0] or t.shape[1] != want[1]:
            raise ValueError(
                f"any4ao.{op}: {name} has shape {tuple(t.shape)}, expected {want} for {n} rows, in_features={k}, "
                f"nbits={nbits}, group_size={group_size}"
            )
        if t.dtype not in _FLOATS:
            raise ValueError(f"any4ao.{op}: {name} dtype {t.dtype} is not one of {_FLOATS}")
        if t.device != qdata.device:
            raise ValueError(f"any4ao.{op}: {name} is on {t.device}, qdata on {qdata.device}")
    if scale.dtype != zero_point.dtype:
        raise ValueError(f"any4ao.{op}: scale and zero_point dtypes differ ({scale.dtype}, {zero_point.dtype})")
    if not lut.is_contiguous():
        raise ValueError(f"any4ao.{op}: lut must be contiguous (strides {tuple(lut.stride())})")
    for name, t in (("qdata", qdata), ("scale", scale), ("zero_point", zero_point)):
        if t.stride(1) != 1:
            raise ValueError(f"any4ao.{op}: {name} rows must be unit-stride (strides {tuple(t.stride())})")
    if n > 1 and zero_point.stride(0) != scale.stride(0):
        raise ValueError(
            f"any4ao.{op}: scale and zero_point have row strides {scale.stride(0)} and {zero_point.stride(0)}; "
            "the kernels read both with one stride (pass them contiguous)"
        )
    if x is not None:
        if x.dim() != 2 or x.dtype not in _FLOATS:
            raise ValueError(f"any4ao.{op}: x must be a 2-D float tensor, got {x.dtype} {tuple(x.shape)}")
        if x.device != qdata.device:
            raise ValueError(f"any4ao.{op}: x is on {x.device}, the weight on {qdata.device}")


def _check_triton_device(op: str, t: torch.Tensor) -> None:
    """Triton launches need CUDA tensors (its interpreter takes CPU ones): a plain error, not the
    driver's '0 active drivers'. The device test first: it is all an eager GPU call pays."""
    device = t.device.type
    if device == "cuda" or (INTERPRET and device == "cpu"):
        return
    from any4ao.validation import _is_data_less

    if not _is_data_less(t):  # (meta / fake tensors: shape inference; a triton_op's body is its fake too)
        raise ValueError(
            f"any4ao.{op} runs Triton kernels, on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1); got "
            f"{t.device} tensors. On the CPU, F.linear on an Any4Tensor and Any4Tensor.dequantize() compute in torch"
        )


def _check_in_features(x, in_features) -> None:
    if in_features != -1 and (x.dim() < 1 or x.shape[-1] != in_features):
        raise ValueError(
            f"any4ao.lut_linear: x has shape {tuple(x.shape)}, but the weight has in_features={in_features}"
        )


torch.library.define(
    "any4ao::lut_linear",
    "(Tensor x, Tensor qdata, Tensor lut, Tensor scale, Tensor zero_point, int nbits, int group_size, "
    "int in_features=-1) -> Tensor",
)


def lut_linear(
    x: torch.Tensor,
    qdata: torch.Tensor,
    lut: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    nbits: int,
    group_size: int,
    in_features: int = -1,
) -> torch.Tensor:
    """x (M, K) @ W^T -> (M, N) in x's dtype. in_features: the weight's K, checked against x's (F.linear
    on an Any4Tensor passes it). Without it K is read off x, and the packed parts cannot tell K = 63
    from 64 where both pack to the same width and group count. A group size that gives the same group
    count (96 for 64 at K = 128) cannot be told apart either: pass the weight's own.
    Differentiable in x only (the weight is frozen, QLoRA-style)."""
    _check_in_features(x, in_features)
    _check("lut_linear", qdata, lut, scale, zero_point, nbits, group_size, x.shape[-1], x)
    _check_triton_device("lut_linear", x)
    x = x.contiguous()
    config = choose(x, qdata, lut, scale, zero_point, nbits, group_size)
    if config is None:
        return dequantize_then_mm(x, qdata, lut, scale, zero_point, nbits, group_size)
    if isinstance(config, GemmConfig):
        return lut_gemm(x, qdata, lut, scale, zero_point, nbits, group_size, config)
    if isinstance(config, WsConfig):
        return lut_gemm_ws(x, qdata, lut, scale, zero_point, group_size, **vars(config))  # its fields by name
    return lut_mma(x, qdata, lut, scale, zero_point, nbits, group_size, config)


torch.library.impl("any4ao::lut_linear", "CompositeExplicitAutograd")(lut_linear)


def direct_call_applies(x: torch.Tensor) -> bool:
    """Whether an eager caller may run `lut_linear` (the op's body) as a plain function: same
    result, without the dispatcher and the Python autograd wrapper that register_autograd puts in
    front of every call (about 10 us of host time on this 2-core CPU against 17 for the whole
    F.linear path). Only when nothing could see the difference: a plain tensor (no lazy negation
    or conjugation, which the dispatcher resolves; functorch-wrapped x never gets here, see
    any4ao/tensor/linear.py), no gradient to record, not tracing (torch.jit, torch.compile), no
    dispatch or function mode (FakeTensorMode, FlopCounter, ...) and no profiler (which shows the
    op by name)."""
    return (
        type(x) is torch.Tensor
        and not (x.requires_grad and torch.is_grad_enabled())
        and not x.is_neg()
        and not x.is_conj()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not torch._C._len_torch_dispatch_stack()
        and not torch._C._len_torch_function_stack()
        and not torch.autograd._profiler_enabled()
    )


@torch.library.register_fake("any4ao::lut_linear")
def _(x, qdata, lut, scale, zero_point, nbits, group_size, in_features=-1):
    _check_in_features(x, in_features)
    _check("lut_linear", qdata, lut, scale, zero_point, nbits, group_size, x.shape[-1], x)
    return x.new_empty(x.shape[0], qdata.shape[0])


def _lut_linear_setup_context(ctx, inputs, output):
    x, qdata, lut, scale, zero_point, nbits, group_size = inputs[:7]
    if any(t.requires_grad for t in (lut, scale, zero_point)):
        warnings.warn(
            "any4ao::lut_linear: lut, scale or zero_point has requires_grad=True but gets no gradient (the op "
            "is differentiable in x only: the weight is frozen)",
            stacklevel=2,
        )
    ctx.save_for_backward(qdata, lut, scale, zero_point)
    ctx.nbits, ctx.group_size, ctx.in_features = nbits, group_size, x.shape[1]


def _lut_linear_backward(ctx, grad_out):
    """QLoRA-style: the weight is frozen, so only x gets a gradient, grad_x = grad_out @ W
    (W dequantized by the Triton kernel, then one matmul)."""
    qdata, lut, scale, zero_point = ctx.saved_tensors
    w = torch.ops.any4ao.dequantize(
        qdata, lut, scale, zero_point, ctx.nbits, ctx.group_size, ctx.in_features, grad_out.dtype
    )
    return (grad_out @ w,) + (None,) * 7


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
    if not isinstance(in_features, (int, torch.SymInt)) or isinstance(in_features, bool) or in_features <= 0:
        raise ValueError(f"any4ao.dequantize: in_features={in_features!r}, expected a positive int")
    if dtype not in _FLOATS:
        raise ValueError(f"any4ao.dequantize: output dtype {dtype} is not one of {_FLOATS}")
    _check("dequantize", qdata, lut, scale, zero_point, nbits, group_size, in_features)
    _check_triton_device("dequantize", qdata)
    return lut_dequantize(qdata, lut, scale, zero_point, nbits, group_size, in_features, dtype)
