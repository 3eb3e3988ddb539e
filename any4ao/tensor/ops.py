"""aten / torch-function implementations for Any4Tensor.

Anything not registered here (or by TorchAOBaseTensor: detach, clone, alias, contiguous)
raises NotImplementedError naming the operator, rather than silently dequantizing.
"""

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import return_and_correct_aliasing
from torchao.utils import fill_defaults

from any4ao.tensor.any4_tensor import Any4Tensor
from any4ao.tensor.linear import any4_linear, autocast_dtype, check_dtype, warn_if_trainable
from any4ao.tensor.packing import codes_per_byte

aten = torch.ops.aten
implements = Any4Tensor.implements
implements_torch_function = Any4Tensor.implements_torch_function


def _with(w: Any4Tensor, **changes) -> Any4Tensor:
    fields = dict(
        qdata=w.qdata,
        lut=w.lut,
        scale=w.scale,
        zero_point=w.zero_point,
        nbits=w.nbits,
        block_size=w.block_size,
        shape=w.shape,
        transposed=w.transposed,
        kernel_preference=w.kernel_preference,
    )
    fields.update(changes)
    return Any4Tensor(**fields)


def _untransposed(w: Any4Tensor) -> Any4Tensor:
    return _with(w, shape=torch.Size(reversed(w.shape)), transposed=not w.transposed)


def _dense(t):
    return t.dequantize() if isinstance(t, Any4Tensor) else t


def _dim(dim: int) -> int:
    """A dim of the 2-D weight, wrapped; out of range an IndexError as torch gives (taken modulo 2,
    split(16, dim=2) split the rows and transpose(0, 2) was a no-op, silently)."""
    if not -2 <= dim <= 1:
        raise IndexError(f"Dimension out of range (expected to be in range of [-2, 1], but got {dim})")
    return dim % 2


def _arguments(args, kwargs, names):
    """The call's arguments by position, keywords filled in (None where absent), and the keywords left."""
    kwargs = dict(kwargs or {})
    values = list(args) + [None] * (len(names) - len(args))
    for i, name in enumerate(names):
        if name in kwargs:
            values[i] = kwargs.pop(name)
    return values, kwargs


@implements(aten.linear.default)
@implements_torch_function(F.linear)
def _linear(func, types, args, kwargs):
    if not kwargs and len(args) >= 2:  # nn.Linear's call: no keyword handling (host time per call)
        return _linear_of(func, args[0], args[1], args[2] if len(args) > 2 else None)
    (x, w, bias), rest = _arguments(args, kwargs, ("input", "weight", "bias"))
    out = rest.pop("out", None)
    if rest:
        raise TypeError(f"linear() got unexpected arguments {sorted(rest)}")
    if out is None:
        return _linear_of(func, x, w, bias)
    # as torch: no autograd through out=, and out takes the result's shape
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, bias)):
        raise RuntimeError(
            "linear(): functions with out=... arguments don't support automatic differentiation, "
            "but one of the arguments requires grad"
        )
    result = _linear_of(func, x, w, bias)
    if out.shape != result.shape:
        out.resize_(result.shape)
    return out.copy_(result)


def _linear_of(func, x, w, bias):
    if isinstance(x, Any4Tensor) or not isinstance(w, Any4Tensor):
        return func(_dense(x), _dense(w), bias)
    if w.transposed:
        # F.linear(x, W^T) = x @ W: the stored matrix is used without transpose.
        warn_if_trainable(w, stacklevel=4)
        cast = autocast_dtype(w.qdata.device.type)
        if cast is not None:  # as any4_linear: dequantized once
            return F.linear(x, w.dequantize(cast), bias)
        check_dtype(x, w)
        return F.linear(x, w.dequantize(x.dtype), bias)
    return any4_linear(x, w, bias)


_MATMULS = [torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__]


@implements_torch_function(_MATMULS + [torch.mm, torch.Tensor.mm, torch.addmm, torch.Tensor.addmm])
def _matmul(func, types, args, kwargs):
    """The matmul forms, before autograd and autocast see them:
    - no gradient for the weight, as through F.linear (autograd would otherwise compute a dense
      (N, K) gradient and store it on the Any4Tensor parameter, where no optimizer can use it);
    - x @ W with a batched x (3-D and up) as F.linear: matmul would fold it into a bmm that expands
      the weight, which an Any4Tensor cannot do;
    - under autocast to another dtype, the weight dequantized once, to that dtype, as F.linear does:
      left to autocast, its LUT, scale and zero point would each be rounded first and the weight
      again (x @ W.t() in bf16: 0.79 % max relative error against 0.32 %).
    Otherwise on to the aten ops below."""
    kwargs = dict(kwargs or {})
    operands = list(args) + list(kwargs.values())
    weight = next(a for a in operands if isinstance(a, Any4Tensor))
    if weight.requires_grad:
        warn_if_trainable(weight, stacklevel=4)
        frozen = weight.detach()
        args = tuple(frozen if a is weight else a for a in args)
        kwargs = {k: frozen if v is weight else v for k, v in kwargs.items()}
        weight = frozen
    if func in _MATMULS:
        (a, b), rest = _arguments(args, kwargs, ("input", "other"))
        if func is torch.Tensor.__rmatmul__:
            a, b = b, a
        if not rest and not (isinstance(a, Any4Tensor) and isinstance(b, Any4Tensor)):
            if isinstance(b, Any4Tensor) and b.dim() == 2 and a.dim() >= 3:
                return F.linear(a, b.t())  # a @ B = F.linear(a, B^T)
            if isinstance(a, Any4Tensor) and a.dim() == 2 and b.dim() >= 3:
                return F.linear(b.mT, a).mT  # W @ b = (b^T @ W^T)^T
            if isinstance(a, Any4Tensor) and a.dim() == 2 and b.dim() == 1:
                return F.linear(b, a)  # W @ v (matmul would take aten.mv)
    cast = autocast_dtype(weight.qdata.device.type)
    if cast is not None and weight.scale.dtype != cast:
        args = tuple(a.dequantize(cast) if isinstance(a, Any4Tensor) else a for a in args)
        kwargs = {k: v.dequantize(cast) if isinstance(v, Any4Tensor) else v for k, v in kwargs.items()}
        return func(*args, **kwargs)
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


def _mm(a, b):
    for name, m in (("mat1", a), ("mat2", b)):  # as torch.mm: matrices only (F.linear takes batched x)
        if m.dim() != 2:
            raise RuntimeError(f"{name} must be a matrix, got {m.dim()}-D tensor")
    if isinstance(b, Any4Tensor) and b.transposed and not isinstance(a, Any4Tensor):
        return any4_linear(a, _untransposed(b))  # a @ W^T  (what F.linear decomposes into)
    if isinstance(a, Any4Tensor) and not a.transposed and not isinstance(b, Any4Tensor):
        return any4_linear(b.t(), a).t()  # W @ b = (b^T @ W^T)^T
    return torch.mm(_dense(a), _dense(b))


@implements(aten.mm.default)
def _(func, types, args, kwargs):
    return _mm(args[0], args[1])


@implements(aten.addmm.default)
def _(func, types, args, kwargs):
    bias, a, b = args[:3]
    beta = kwargs.get("beta", args[3] if len(args) > 3 else 1)
    alpha = kwargs.get("alpha", args[4] if len(args) > 4 else 1)
    out = _mm(a, b)
    # as torch.addmm: the bias broadcasts to the product's shape (never grows it) and shares its dtype
    if torch.broadcast_shapes(bias.shape, out.shape) != out.shape:
        raise ValueError(f"addmm: bias of shape {tuple(bias.shape)} does not broadcast to {tuple(out.shape)}")
    if bias.dtype != out.dtype:
        raise ValueError(f"addmm: bias dtype {bias.dtype} does not match the product's dtype {out.dtype}")
    if alpha != 1:
        out = out * alpha
    if beta == 0:  # as torch.addmm: the bias is not read (NaN or Inf in it does not propagate)
        return out
    return out + (bias if beta == 1 else beta * bias)


@implements(aten.t.default)
def _(func, types, args, kwargs):
    return return_and_correct_aliasing(func, args, kwargs, _untransposed(args[0]))


@implements(aten.permute.default)
def _(func, types, args, kwargs):
    """w.T (permute(1, 0)) and permute(0, 1) of the 2-D weight."""
    if len(args[1]) != 2:
        raise NotImplementedError(f"Any4Tensor permute takes the two dims of the 2-D weight, got {args[1]}")
    w, dims = args[0], [_dim(d) for d in args[1]]
    if sorted(dims) != [0, 1]:
        raise NotImplementedError(f"Any4Tensor permute takes the two dims of the 2-D weight, got {args[1]}")
    return return_and_correct_aliasing(func, args, kwargs, _with(w) if dims == [0, 1] else _untransposed(w))


@implements_torch_function(torch.Tensor.data.__set__)
def _(func, types, args, kwargs):
    """`param.data = t` would replace only the wrapper's empty storage and leave the packed parts:
    the weight would not change, silently."""
    raise NotImplementedError(
        "assigning .data of an Any4Tensor would not change the quantized weight; assign a new parameter "
        "(module.weight = nn.Parameter(...)) or load a state dict instead"
    )


@implements_torch_function(torch.Tensor.share_memory_)
def _(func, types, args, kwargs):
    """Shares the packed parts (torch would reach for the wrapper's own storage, which it does not
    have, and crash the process)."""
    w = args[0]
    for name in Any4Tensor.tensor_data_names:
        getattr(w, name).share_memory_()
    return w


@implements_torch_function(torch.Tensor.is_shared)
def _(func, types, args, kwargs):
    return all(getattr(args[0], name).is_shared() for name in Any4Tensor.tensor_data_names)


@implements(aten.transpose.int)
def _(func, types, args, kwargs):
    w, dim0, dim1 = args[:3]
    same = _dim(dim0) == _dim(dim1)
    return return_and_correct_aliasing(func, args, kwargs, _with(w) if same else _untransposed(w))


def _check_part_dtype(dtype: torch.dtype, verb: str) -> None:
    """The dtypes an Any4Tensor's LUT, scales and zero points can take (`.to` and `empty_like`)."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(
            f"Any4Tensor cannot be {verb} {dtype}: its LUT, scales and zero points take "
            "float16, bfloat16, float32 or float64"
        )


@implements(aten.slice.Tensor)
def _(func, types, args, kwargs):
    """Slices along N (rows: any range) or along K (whole groups only), in logical dims."""
    w, dim, start, end, step = fill_defaults(args, 5, [0, None, None, 1])
    dim = _dim(dim)
    stored_dim = 1 - dim if w.transposed else dim
    size = w.shape[dim]
    start = 0 if start is None else (start + size if start < 0 else start)
    end = size if end is None else (end + size if end < 0 else end)
    start, end = max(0, min(start, size)), max(0, min(end, size))
    end = max(start, end)
    if step != 1:
        raise NotImplementedError(f"Any4Tensor slice supports step=1 only, got step={step}")
    if end == start and stored_dim == 1:  # zero rows are fine; zero in_features leave no group to hold
        raise ValueError(
            f"Any4Tensor cannot be sliced to an empty range of in_features ([{start}:{end}] of dim {dim}, size {size})"
        )
    shape = list(w.shape)
    shape[dim] = end - start
    if stored_dim == 0:
        rows = slice(start, end)
        new = _with(
            w,
            qdata=w.qdata[rows],
            lut=w.lut[rows],
            scale=w.scale[rows],
            zero_point=w.zero_point[rows],
            shape=torch.Size(shape),
        )
    else:
        g, per = w.group_size, codes_per_byte(w.nbits)
        if start % g or (end % g and end != size):
            raise ValueError(
                f"Any4Tensor can only be sliced along in_features at group boundaries "
                f"(group_size={g}); got [{start}:{end}] of {size}"
            )
        new = _with(
            w,
            qdata=w.qdata[:, start // per : -(-end // per)],
            scale=w.scale[:, start // g : -(-end // g)],
            zero_point=w.zero_point[:, start // g : -(-end // g)],
            shape=torch.Size(shape),
        )
    return return_and_correct_aliasing(func, args, kwargs, new)


@implements(aten._to_copy.default)
def _(func, types, args, kwargs):
    """`.to(device)` moves every inner tensor; `.to(dtype)` re-types LUT, scales and zeros
    (codes stay uint8, shared with the source: model.half() and from_pretrained(dtype=) keep one
    copy of them), which is how `model.to(torch.float16)` works on a quantized model. A call that
    changes neither (`.to(..., copy=True)`) copies every part: it returned the source's own parts,
    so a copy_ into the "copy" changed the original."""
    w = args[0]
    device = kwargs.get("device") or w.device
    dtype = kwargs.get("dtype") or w.dtype
    non_blocking = kwargs.get("non_blocking", False)
    _check_part_dtype(dtype, "converted to")
    same = torch.device(device) == w.qdata.device and dtype == w.dtype

    def move(t, as_float):
        return t.to(device=device, dtype=dtype if as_float else t.dtype, non_blocking=non_blocking, copy=same)

    new = _with(
        w,
        qdata=move(w.qdata, False),
        lut=move(w.lut, True),
        scale=move(w.scale, True),
        zero_point=move(w.zero_point, True),
    )
    if dtype != w.dtype and torch.finfo(dtype).max < torch.finfo(w.dtype).max:
        _check_narrowing(w, new, dtype)
    return return_and_correct_aliasing(func, args, kwargs, new)


def _layout(w) -> str:
    if not isinstance(w, Any4Tensor):
        return f"a {type(w).__name__} of shape {tuple(w.shape)} and dtype {w.dtype}"
    orientation = ", transposed" if w.transposed else ""
    return (
        f"an Any4Tensor of shape {tuple(w.shape)}{orientation}, nbits={w.nbits}, group_size={w.block_size[1]}, "
        f"kernel_preference={w.kernel_preference!r}"
    )


@implements(aten.copy_.default)
def _(func, types, args, kwargs):
    """`load_state_dict` into a quantized parameter: the parts are copied (and cast to the
    destination's dtype) only from an Any4Tensor of the same quantized layout, and never into Inf
    (the check `.to(dtype)` makes), all checks before the first part changes."""
    dst, src = args[0], args[1]
    if not (isinstance(dst, Any4Tensor) and isinstance(src, Any4Tensor)) or _layout(dst) != _layout(src):
        raise ValueError(
            f"copy_ into {_layout(dst)} from {_layout(src)}: a quantized weight copies only from one of the same "
            "quantized layout (quantize the float weights with the same config, or dequantize())"
        )
    if _is_in_features_slice(dst) and not torch.equal(dst.lut, src.lut):
        # each row's LUT serves all its in_features: copying src's into the slice re-valued the
        # columns outside it, silently (w[:, :32].copy_(v[:, :32]) changed w[:, 32:])
        raise ValueError(
            f"copy_ into {_layout(dst)}, a slice along in_features of a wider weight, from a weight with other "
            "LUTs: the slice shares each row's LUT with the columns outside it, which would change too; copy the "
            "whole weight, or into a .clone() of the slice"
        )
    if src.dtype != dst.dtype and torch.finfo(dst.dtype).max < torch.finfo(src.dtype).max:
        parts = {name: getattr(src, name).to(dst.dtype) for name in ("lut", "scale", "zero_point")}
        _check_narrowing(src, _with(src, **parts), dst.dtype)
    for name in Any4Tensor.tensor_data_names:
        getattr(dst, name).copy_(getattr(src, name))
    return dst


def _is_in_features_slice(w: Any4Tensor) -> bool:
    """The packed codes are a column window of a wider stored matrix (w[:, a:b], narrow or split
    along in_features; rows of it too): slicing keeps the row stride, a clone does not."""
    q = w.qdata
    return q.shape[0] > 0 and q.stride(1) == 1 and q.stride(0) > q.shape[1]


@implements(aten.equal.default)
def _(func, types, args, kwargs):
    """torch.equal: the same quantized layout and equal parts (transformers compares tied weights
    with it when it loads a checkpoint); a quantized and a float tensor are never equal."""
    a, b = args[0], args[1]
    if not (isinstance(a, Any4Tensor) and isinstance(b, Any4Tensor)) or _layout(a) != _layout(b):
        return False
    return all(torch.equal(getattr(a, name), getattr(b, name)) for name in Any4Tensor.tensor_data_names)


class NarrowingError(ValueError):
    """An Any4Tensor cast to a dtype that cannot hold its values. `reason` is the message without the
    note on model.to(), for callers that convert all or nothing (the load paths)."""

    def __init__(self, reason: str, dtype: torch.dtype):
        # torch converts a module's parameters one by one and cannot be asked to check them all first
        super().__init__(
            f"{reason}. In model.to() / .half() the conversion stops at this weight: parameters converted "
            f"before it are already {dtype}, the rest are not"
        )
        self.reason = reason


def _check_narrowing(old: Any4Tensor, new: Any4Tensor, dtype: torch.dtype) -> None:
    """`.to(float16)` of weights beyond fp16's range would give Inf weights: refused. So are group
    scales below its normal range (weights ~1e-8) that the cast would change by more than half of
    fp16's relative step: kept as subnormals they keep a few bits or none. Scales that survive the
    cast exactly (they came from fp16) pass. Vectorised, O(rows x groups); skipped on fake tensors
    while tracing."""
    from any4ao.validation import _is_data_less, dequant_range_ok

    if _is_data_less(new.scale) or new.qdata.shape[0] == 0:
        return
    finite = all(bool(torch.isfinite(t).all()) for t in (new.lut, new.scale, new.zero_point))
    if not finite or not bool(dequant_range_ok(new.lut, new.scale, new.zero_point, dtype).all()):
        raise NarrowingError(
            f"Any4Tensor of shape {tuple(old.shape)} cannot be converted from {old.dtype} to {dtype}: its values "
            f"exceed {dtype}'s range (largest finite {torch.finfo(dtype).max:.4g}) and would become Inf",
            dtype,
        )
    scale = old.scale.abs()
    low = (scale != 0) & (scale < torch.finfo(dtype).tiny)
    if bool(low.any()):
        wide = torch.promote_types(old.scale.dtype, torch.float32)
        change = (new.scale.to(wide).abs() - scale.to(wide)).abs() / scale.to(wide)
        worst = float(change[low].max())
        if worst > torch.finfo(dtype).eps / 2:
            raise NarrowingError(
                f"Any4Tensor of shape {tuple(old.shape)} cannot be converted from {old.dtype} to {dtype}: group "
                f"scales down to {float(scale[low].min()):.3g} fall below {dtype}'s normal range (smallest normal "
                f"{torch.finfo(dtype).tiny:.3g}) and would change by up to {100 * worst:.2g} %",
                dtype,
            )


# ----- row sharding: what FSDP2's fully_shard does to a parameter (see any4ao/tensor/fsdp.py) -----
def _require_row_major(w: Any4Tensor, op: str) -> None:
    if w.transposed or w.ndim != 2:
        raise NotImplementedError(
            f"Any4Tensor {op} works on the stored (out, in) orientation only, "
            f"got shape {tuple(w.shape)} transposed={w.transposed}"
        )


@implements(aten.split.Tensor)
def _(func, types, args, kwargs):
    """Blocks of `split_size` rows (FSDP2, column-wise TP) or of in_features (row-wise TP, which
    must cut at group boundaries: a group's scale and zero cannot be split). torch.chunk lands here."""
    w, split_size, dim = fill_defaults(args, 3, [0])
    _require_row_major(w, "split")
    dim = _dim(dim)
    size = w.shape[dim]
    if split_size < 0 or (split_size == 0 and size):  # as torch (range() failed, or returned no block)
        raise RuntimeError(f"split expects a positive split_size for a dimension of size {size}, got {split_size}")
    if dim == 1 and split_size % w.group_size and split_size < size:
        raise ValueError(
            f"Any4Tensor split along in_features={size} into blocks of {split_size}: blocks must hold whole "
            f"quantization groups (group_size={w.group_size}); for row-wise tensor parallel pick a world size "
            f"for which ceil(in_features / world) is a multiple of {w.group_size}, or quantize with a smaller group_size"
        )
    starts = range(0, size, split_size) if size else [0]  # (as torch: an empty dim gives one empty block)
    return [aten.slice.Tensor(w, dim, s, min(size, s + split_size)) for s in starts]


@implements(aten.new_zeros.default)
def _(func, types, args, kwargs):
    """An all-zero Any4Tensor (zero codes, LUT, scales, zeros) with `size[0]` rows of the same width."""
    w, size = args[0], list(args[1])
    _require_row_major(w, "new_zeros")
    if len(size) != 2 or size[1] != w.in_features:
        raise NotImplementedError(f"Any4Tensor.new_zeros keeps in_features={w.in_features}; got size {size}")
    device = kwargs.get("device") or w.device

    def zeros_like_rows(t):
        return torch.zeros(size[0], t.shape[1], dtype=t.dtype, device=device)

    return _with(
        w,
        qdata=zeros_like_rows(w.qdata),
        lut=zeros_like_rows(w.lut),
        scale=zeros_like_rows(w.scale),
        zero_point=zeros_like_rows(w.zero_point),
        shape=torch.Size(size),
    )


@implements(aten.empty_like.default)
def _(func, types, args, kwargs):
    """`module.to_empty(device=...)` after a meta-device build: the same quantized layout on `device`,
    its parts zero (valid values, unlike uninitialised memory) until load_state_dict / copy_ fills them."""
    w = args[0]
    device = kwargs.get("device") or w.device
    dtype = kwargs.get("dtype") or w.dtype
    _check_part_dtype(dtype, "made empty in")

    def zeros(t, as_float):
        return torch.zeros(t.shape, dtype=dtype if as_float else t.dtype, device=device)

    return _with(
        w,
        qdata=zeros(w.qdata, False),
        lut=zeros(w.lut, True),
        scale=zeros(w.scale, True),
        zero_point=zeros(w.zero_point, True),
    )


@implements(aten.view.default)
def _(func, types, args, kwargs):
    """view(-1): a flat alias sharing the parts (FSDP2 keeps one); view to the same shape: alias."""
    w, size = args[0], list(args[1])
    if size in ([-1], [w.numel()]) and w.ndim == 2 and not w.transposed:
        return _with(w, shape=torch.Size([w.numel()]))
    if torch.Size(size) == w.shape:
        return _with(w)
    raise NotImplementedError(
        f"Any4Tensor.view{tuple(size)} of shape {tuple(w.shape)}{', transposed' if w.transposed else ''}: only "
        "view(-1) of an untransposed weight and views to its own shape are supported"
    )


@implements(aten.as_strided.default)
def _(func, types, args, kwargs):
    """Contiguous, offset-0 windows of whole rows: FSDP2 uses it to drop the padding rows of an
    all-gathered (world * padded rows) weight."""
    w, size, stride = args[0], list(args[1]), tuple(args[2])
    offset = args[3] if len(args) > 3 else kwargs.get("storage_offset", 0) or 0
    _require_row_major(w, "as_strided")
    contiguous = (size[1], 1) if len(size) == 2 else None
    if len(size) != 2 or size[1] != w.in_features or size[0] > w.shape[0] or offset or stride != contiguous:
        raise NotImplementedError(
            f"Any4Tensor.as_strided(size={size}, stride={stride}, offset={offset}) of "
            f"shape {tuple(w.shape)}: only a contiguous prefix of whole rows is supported"
        )
    return aten.slice.Tensor(w, 0, 0, size[0])
