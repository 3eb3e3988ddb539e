"""Any4Tensor: a weight stored as packed codes + a per-row LUT + a scale and zero point per group.

    W[n, k] = lut[n, code[n, k]] * scale[n, k // G] + zero_point[n, k // G]

The class holds data and its constructors. The aten ops it supports are registered by
`any4ao.tensor.ops` (imported by the package, `any4ao/tensor/__init__.py`), the matmul routing is
in `any4ao.tensor.linear`, FSDP2's hooks in `any4ao.tensor.fsdp`.
"""

import dataclasses
import hashlib
import warnings
from typing import List, Optional

import torch
from torchao.utils import TorchAOBaseTensor, _torchao_base_tensor__setstate__

from any4ao.codebooks.group_scaling import expand_groups
from any4ao.codebooks.quantize import quantize_weight
from any4ao.config import Any4WeightOnlyConfig, KernelPreference
from any4ao.tensor import fsdp
from any4ao.tensor.packing import pack_codes, packed_width, unpack_codes
from any4ao.validation import (
    InvalidAny4TensorError,
    check_channel_weight,
    check_hessian,
    check_structure,
    check_values,
    check_weight,
)

__all__ = ["Any4Tensor"]


def _gpu_kernels() -> bool:
    from any4ao.kernels.selector import kernels_loaded

    return kernels_loaded()


def _unsupported_op_message(func, args) -> str:
    t = next((a for a in args if isinstance(a, Any4Tensor)), None)
    what = (
        f"an Any4Tensor ({t.nbits}-bit LUT codes, group {t.group_size}, shape {tuple(t.shape)}, {t.dtype})"
        if t is not None
        else "an Any4Tensor"
    )
    name = func.__name__ if hasattr(func, "__name__") else str(func)
    inplace = name.split(".")[0].endswith("_")
    advice = (
        "a quantized weight is frozen: leave it out of optimizers (requires_grad_(False)), or train adapters beside it"
        if inplace
        else "it supports F.linear / matmul, copies, moves and views; for anything else, including quantizing it "
        "again with another torchao config, take its float values with .dequantize() (from the unquantized "
        "model, for a new config)"
    )
    return f"aten.{name} is not implemented for {what}: {advice}"


class Any4Tensor(TorchAOBaseTensor):
    """LUT-quantized 2-D weight (out_features N x in_features K).

    Tensor data:
        qdata:      (N, ceil(K / codes_per_byte)) uint8, packed codes (see any4ao.tensor.packing)
        lut:        (N, 2**nbits), the tensor's dtype; sorted per row
        scale:      (N, ceil(K / G)), the tensor's dtype
        zero_point: (N, ceil(K / G)), the tensor's dtype
    Attributes:
        nbits:      2, 3 or 4
        block_size: [1, G], torchao's description of the group granularity
        shape:      the logical shape, (N, K), or (K, N) when `transposed`
        transposed: set by `.t()`; the data stays in (N, K) orientation
        kernel_preference: "auto" or "dequantize" (any4ao.config.KernelPreference)
    Validation (any4ao.validation): every construction checks the structure (shapes, dtypes,
    devices, nbits, group size; metadata only, also on fake tensors); `validate_values()` checks
    codes, LUTs, scales and zero points and is run by from_codes / from_hp and every load path
    (load_quantized, from_pretrained, torch.load, whose unpickling goes through __setstate__).
    A scale of 0 is valid: a constant group dequantizes to its zero point.
    """

    tensor_data_names = ["qdata", "lut", "scale", "zero_point"]
    tensor_attribute_names = ["nbits", "block_size", "shape"]
    optional_tensor_attribute_names = ["transposed", "kernel_preference"]

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        """torchao's table dispatch; an op it lacks gets an error that says what the tensor is and
        what to do, where torchao's names only the op and argument types (an optimizer step reached
        aten.add_, a second torchao config aten.amin)."""
        table = cls._ATEN_OP_TABLE.get(cls, {})
        if func in table:
            return table[func](func, types, args, {} if kwargs is None else kwargs)
        raise NotImplementedError(_unsupported_op_message(func, args))

    def __new__(
        cls, qdata, lut, scale, zero_point, nbits, block_size, shape, transposed=False, kernel_preference="auto"
    ):
        # the structural checks run before the wrapper reads scale.dtype / qdata.device
        transposed = False if transposed is None else transposed
        check_structure(qdata, lut, scale, zero_point, nbits, block_size, shape, transposed)
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, device=qdata.device, dtype=scale.dtype, requires_grad=False
        )

    def __init__(
        self,
        qdata: torch.Tensor,
        lut: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        nbits: int,
        block_size: List[int],
        shape: torch.Size,
        transposed: Optional[bool] = False,
        kernel_preference: Optional[str] = "auto",
    ):
        super().__init__()
        self.qdata = qdata
        self.lut = lut
        self.scale = scale
        self.zero_point = zero_point
        self.nbits = nbits
        self.block_size = list(block_size)
        self.transposed = bool(transposed)
        try:
            self.kernel_preference = KernelPreference(kernel_preference or "auto").value
        except ValueError:
            raise InvalidAny4TensorError(f"invalid Any4Tensor: kernel_preference={kernel_preference!r}") from None

    def _check_consistency(self, name=None) -> None:
        """Shapes, dtypes, devices, nbits and group size agree (any4ao.validation.check_structure).
        Metadata only, so it runs on every construction (views in ops, fake tensors under
        torch.compile); the value checks are `validate_values`, run by the load paths."""
        check_structure(
            self.qdata,
            self.lut,
            self.scale,
            self.zero_point,
            self.nbits,
            self.block_size,
            self.shape,
            self.transposed,
            name,
        )

    def validate_values(self, name=None) -> "Any4Tensor":
        """Value checks (any4ao.validation.check_values): code range for the bit width, zero padding
        codes, finite sorted LUT rows, finite non-negative scales, finite zero points, and no group
        whose dequantized values overflow the dtype. Raises InvalidAny4TensorError naming `name`.
        Vectorised; the load paths run it (load_quantized, from_pretrained, torch.load)."""
        check_values(self, name)
        return self

    # ----- geometry of the stored (N, K) matrix, whatever the logical orientation -----
    @property
    def group_size(self) -> int:
        return self.block_size[-1]

    @property
    def out_features(self) -> int:
        return self.qdata.shape[0]

    @property
    def in_features(self) -> int:
        # Cached: .ndim / .shape of a tensor subclass go through __torch_function__, and every
        # linear asks (host time per call). The logical shape never changes after construction.
        k = self.__dict__.get("_in_features")
        if k is None:
            if self.ndim == 1:  # flat alias
                k = self.shape[0] // max(1, self.qdata.shape[0])
            else:
                k = self.shape[0] if self.transposed else self.shape[1]
            self.__dict__["_in_features"] = k
        return k

    # ----- FSDP2: all-gather the packed parts (any4ao/tensor/fsdp.py) -----
    def fsdp_pre_all_gather(self, mesh):
        return fsdp.pre_all_gather(self, mesh)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        return fsdp.post_all_gather(self, all_gather_outputs, metadata, param_dtype, out=out)

    def _quantization_type(self):
        return (
            f"shape={tuple(self.shape)}, nbits={self.nbits}, group_size={self.group_size}, "
            f"transposed={self.transposed}, device={self.device}, dtype={self.dtype}"
        )

    @classmethod
    def from_hp(
        cls,
        weight: torch.Tensor,
        config: Optional[Any4WeightOnlyConfig] = None,
        channel_weight: Optional[torch.Tensor] = None,
        name: str = "weight",
        hessian: Optional[torch.Tensor] = None,
        **overrides,
    ) -> "Any4Tensor":
        """Quantize a high-precision (N, K) weight with `config` (default: Any4WeightOnlyConfig()),
        any of its fields overridden by keyword, e.g. `from_hp(w, codebook="nf4", group_size=64)`.
        The weight is validated first (any4ao.validation.check_weight: finite, 2-D, float, with data);
        the algorithm is in any4ao.codebooks.quantize. `hessian` (K, K): the layer inputs'
        E[x x^T], used when config.error_feedback is "gptq"."""
        config = dataclasses.replace(config or Any4WeightOnlyConfig(), **overrides)
        check_weight(name, weight, config.lut_dtype)
        weight = weight.detach()  # the values only (a parameter made under inference_mode cannot record grad)
        if channel_weight is not None:
            check_channel_weight(name, channel_weight, weight)
        gptq = config.error_feedback.value == "gptq"
        if gptq and hessian is None:
            raise ValueError(f"layer {name!r}: error_feedback='gptq' needs the layer's Hessian (hessian=...)")
        if gptq:
            check_hessian(name, hessian, weight)
            hessian = hessian.to(weight.device)
        if channel_weight is not None:
            channel_weight = channel_weight.to(weight.device)
        try:
            q = quantize_weight(weight, config, channel_weight, hessian if gptq else None)
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from e
        _warn_if_scales_subnormal(q.scale, name)
        return cls.from_codes(
            q.codes,
            q.lut,
            q.scale,
            q.zero_point,
            config.bits,
            config.group_size,
            kernel_preference=config.kernel_preference.value,
        )

    @classmethod
    def from_codes(
        cls, codes, lut, scale, zero_point, nbits: int, group_size: int, kernel_preference: str = "auto"
    ) -> "Any4Tensor":
        """Build from unpacked (N, K) integer codes in [0, 2**nbits) and the per-row / per-group
        parameters; every structural and value check runs (InvalidAny4TensorError otherwise)."""
        if not isinstance(codes, torch.Tensor) or codes.ndim != 2 or codes.is_floating_point() or codes.is_complex():
            raise InvalidAny4TensorError(
                f"codes must be a 2-D integer tensor, got {getattr(codes, 'dtype', type(codes).__name__)} "
                f"{tuple(getattr(codes, 'shape', ()))}"
            )
        if nbits not in (2, 3, 4) or isinstance(nbits, bool) or not isinstance(nbits, int):
            raise InvalidAny4TensorError(f"nbits={nbits!r}, expected the int 2, 3 or 4")
        n, k = codes.shape
        if codes.numel() and codes.device.type != "meta":
            out_of_range = (codes < 0) | (codes >= 2**nbits)
            if bool(out_of_range.any()):
                first = tuple(out_of_range.nonzero()[0].tolist())
                raise InvalidAny4TensorError(
                    f"codes must lie in [0, {2**nbits}) for nbits={nbits}; got {int(codes[first])} at {first}"
                )
        qdata = pack_codes(codes, nbits)
        assert qdata.shape[1] == packed_width(k, nbits)
        lut, scale, zero_point = (
            p.contiguous() if isinstance(p, torch.Tensor) else p for p in (lut, scale, zero_point)
        )
        t = cls(
            qdata,
            lut,
            scale,
            zero_point,
            nbits,
            [1, group_size],
            torch.Size([n, k]),
            kernel_preference=kernel_preference,
        )
        return t.validate_values()

    def codes(self) -> torch.Tensor:
        """Unpacked (N, K) uint8 codes of the stored matrix."""
        k = self.in_features
        return unpack_codes(self.qdata, self.nbits, k)

    def dequantize(self, output_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense weight in its logical orientation. Computed in float32 (float64 if asked for
        float64), rounded once to `output_dtype` (default: the tensor's dtype)."""
        if self.ndim != 2:
            raise NotImplementedError("the flat view(-1) alias of an Any4Tensor (FSDP2 bookkeeping) has no dense form")
        output_dtype = output_dtype or self.dtype
        if not isinstance(output_dtype, torch.dtype) or not output_dtype.is_floating_point:
            raise ValueError(
                f"Any4Tensor.dequantize: output_dtype must be a floating torch.dtype, got {output_dtype!r}"
            )
        if self.qdata.is_cuda and output_dtype != torch.float64 and _gpu_kernels():
            k = self.in_features
            w = torch.ops.any4ao.dequantize(
                self.qdata, self.lut, self.scale, self.zero_point, self.nbits, self.group_size, k, output_dtype
            )
            return w.t() if self.transposed else w
        compute = torch.float64 if output_dtype == torch.float64 else torch.float32
        codes = self.codes().long()
        k = codes.shape[1]
        values = torch.gather(self.lut.to(compute), 1, codes)
        w = values * expand_groups(self.scale.to(compute), k, self.group_size) + expand_groups(
            self.zero_point.to(compute), k, self.group_size
        )
        w = w.to(output_dtype)
        return w.t() if self.transposed else w

    def __tensor_flatten__(self):
        """(inner tensor names, metadata), as torchao's generic version returns them, without its
        hasattr checks and comprehensions: a compiled model calls this twice per Any4Tensor on
        every call (dynamo's metadata guard, AOT autograd's input unwrapping): for a 224-linear Llama
        that took 2.25 ms of host time per call, now 0.62 ms (cProfile, 2-core CPU). Tested equal
        to the generic version."""
        return list(self.tensor_data_names), {
            "nbits": self.nbits,
            "block_size": self.block_size,
            "shape": self.shape,
            "transposed": self.transposed,
            "kernel_preference": self.kernel_preference,
        }

    def _stable_hash_for_caching(self) -> str:
        """Key for AOT autograd's compile cache (torch's extension point for tensor subclasses):
        metadata only, the same across processes. The codes, LUT, scales and zeros are graph inputs,
        so their values do not change the compiled code; their shapes, strides and dtypes do."""
        parts = [
            type(self).__qualname__,
            tuple(self.shape),
            str(self.dtype),
            self.requires_grad,
            self.nbits,
            tuple(self.block_size),
            self.transposed,
            self.kernel_preference,
        ]
        for name in self.tensor_data_names:
            t = getattr(self, name)
            parts.append((name, tuple(t.shape), tuple(t.stride()), str(t.dtype), t.device.type))
        return hashlib.blake2b(repr(parts).encode(), digest_size=16).hexdigest()

    def storage_bytes(self) -> int:
        """Bytes held by every inner tensor (what the weight really costs in memory)."""
        return sum(t.numel() * t.element_size() for t in (self.qdata, self.lut, self.scale, self.zero_point))

    def bits_per_weight(self) -> float:
        return 8.0 * self.storage_bytes() / self.numel()


def _warn_if_scales_subnormal(scale: torch.Tensor, name: str) -> None:
    """Group scales below a 16-bit dtype's normal range (weights around 1e-5 in fp16, or fp32 weights
    stored with lut_dtype=float16) keep only a few bits: say so rather than quantize worse in silence
    (int4 on fp32 weights ~3e-7 stored in fp16: relative error 0.21 against 0.087 in fp32)."""
    if scale.dtype not in (torch.float16, torch.bfloat16) or scale.device.type == "meta":
        return
    low = (scale != 0) & (scale.abs() < torch.finfo(scale.dtype).tiny)
    count = int(low.sum())
    if count:
        warnings.warn(
            f"{name}: {count} of {scale.numel()} group scales fall below {scale.dtype}'s normal range "
            f"(down to {float(scale.abs()[low].min()):.3g}) and keep fewer bits, so those groups quantize with a "
            f"larger error; lut_dtype=torch.float32 stores them exactly",
            stacklevel=3,
        )


def _checked_setstate(self, state):
    """Unpickling (torch.load, also weights_only=True): torchao's __setstate__ fills the parts in
    without __init__, so the structural and value checks run here."""
    _torchao_base_tensor__setstate__(self, state)
    self.__dict__.pop("_in_features", None)  # a cache (in_features), recomputed from the shape, never trusted
    what = f"unpickled by torch.load (shape {tuple(self.shape)}, nbits={getattr(self, 'nbits', '?')})"
    missing = [p for p in self.tensor_data_names + ["nbits", "block_size"] if getattr(self, p, None) is None]
    if missing:
        raise InvalidAny4TensorError(f"invalid Any4Tensor {what}: parts missing: {missing}")
    self.transposed = self.transposed or False
    try:
        self.kernel_preference = KernelPreference(self.kernel_preference or "auto").value
    except ValueError:
        raise InvalidAny4TensorError(f"invalid Any4Tensor {what}: kernel_preference={self.kernel_preference!r}")
    self._check_consistency(what)
    # the wrapper's dtype and device come from the pickle too: they must be the parts' (construction
    # takes them from scale and qdata), or ops check x against one dtype and compute in another
    dtype, device = torch.Tensor.dtype.__get__(self), torch.Tensor.device.__get__(self)
    if dtype != self.scale.dtype:
        raise InvalidAny4TensorError(
            f"invalid Any4Tensor {what}: the tensor says {dtype}, its parts are {self.scale.dtype} (an edited file?)"
        )
    if device != self.qdata.device:  # torch.load's dict map_location moves the parts, not the wrapper
        raise InvalidAny4TensorError(
            f"Any4Tensor {what}: its parts were loaded to {self.qdata.device} but the tensor itself stays on "
            f"{device}: torch.load's map_location as a dict (e.g. {{'cuda:0': 'cpu'}}) does not reach tensor "
            "subclasses; pass map_location as a device ('cpu', torch.device('cuda:1')) instead"
        )
    self.validate_values(what)


# TorchAOBaseTensor.__init_subclass__ installs its own __setstate__ on every subclass; wrap it
Any4Tensor.__setstate__ = _checked_setstate
torch.serialization.add_safe_globals([Any4Tensor])
