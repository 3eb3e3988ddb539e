"""Any4Tensor: a weight stored as packed codes + a per-row LUT + a scale and zero point per group.

    W[n, k] = lut[n, code[n, k]] * scale[n, k // G] + zero_point[n, k // G]

The class holds data and its constructors. The aten ops it supports are registered by
`any4ao.tensor.ops` (imported by the package, `any4ao/tensor/__init__.py`), the matmul routing is
in `any4ao.tensor.linear`, FSDP2's hooks in `any4ao.tensor.fsdp`.
"""

import dataclasses
import hashlib
from typing import List, Optional

import torch
from torchao.utils import TorchAOBaseTensor

from any4ao.codebooks.group_scaling import expand_groups, num_groups
from any4ao.codebooks.quantize import quantize_weight
from any4ao.config import Any4WeightOnlyConfig, KernelPreference
from any4ao.tensor import fsdp
from any4ao.tensor.packing import pack_codes, packed_width, unpack_codes

__all__ = ["Any4Tensor"]


def _gpu_kernels() -> bool:
    from any4ao.kernels.selector import kernels_loaded

    return kernels_loaded()


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
    """

    tensor_data_names = ["qdata", "lut", "scale", "zero_point"]
    tensor_attribute_names = ["nbits", "block_size", "shape"]
    optional_tensor_attribute_names = ["transposed", "kernel_preference"]

    def __new__(
        cls, qdata, lut, scale, zero_point, nbits, block_size, shape, transposed=False, kernel_preference="auto"
    ):
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
        self.kernel_preference = KernelPreference(kernel_preference or "auto").value
        self._check_consistency()

    def _check_consistency(self) -> None:
        """Shapes, dtypes and devices of the parts agree. Runs on every construction, so a corrupt
        or mismatched checkpoint (torch.load, safetensors, transformers) fails here, by name."""

        def fail(what):
            raise ValueError(f"inconsistent Any4Tensor (corrupt or mismatched checkpoint?): {what}")

        if self.nbits not in (2, 3, 4):
            fail(f"nbits={self.nbits!r}, expected 2, 3 or 4")
        if len(self.block_size) != 2 or self.block_size[0] != 1 or not self.block_size[1] > 0:
            fail(f"block_size={self.block_size}, expected [1, group_size]")
        if self.qdata.dtype != torch.uint8 or self.qdata.ndim != 2:
            fail(f"qdata must be 2-D uint8, got {self.qdata.dtype} {tuple(self.qdata.shape)}")
        if len(self.shape) == 1 and not self.transposed and self.qdata.shape[0] > 0:
            # the flat alias `view(-1)` makes for FSDP2's bookkeeping; no op computes with it
            n, k = self.qdata.shape[0], self.shape[0] // self.qdata.shape[0]
            if n * k != self.shape[0]:
                fail(f"flat shape {tuple(self.shape)} is not a whole number of {n} rows")
        elif len(self.shape) != 2:
            fail(f"shape={tuple(self.shape)} is not 2-D")
        else:
            n, k = (self.shape[1], self.shape[0]) if self.transposed else (self.shape[0], self.shape[1])
        expected = {
            "qdata": (n, packed_width(k, self.nbits)),
            "lut": (n, 2**self.nbits),
            "scale": (n, num_groups(k, self.group_size)),
            "zero_point": (n, num_groups(k, self.group_size)),
        }
        for name, want in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != want:
                fail(
                    f"{name} has shape {got}, expected {want} for a {n}x{k} weight, nbits={self.nbits}, "
                    f"group_size={self.group_size}"
                )
        if not (self.lut.dtype == self.scale.dtype == self.zero_point.dtype) or not self.lut.is_floating_point():
            fail(
                f"lut, scale, zero_point dtypes {self.lut.dtype}, {self.scale.dtype}, {self.zero_point.dtype} "
                "must be one float dtype"
            )
        devices = {t.device for t in (self.qdata, self.lut, self.scale, self.zero_point)}
        if len(devices) != 1:
            fail(f"parts live on different devices {sorted(map(str, devices))}")

    # ----- geometry of the stored (N, K) matrix, whatever the logical orientation -----
    @property
    def group_size(self) -> int:
        return self.block_size[-1]

    @property
    def out_features(self) -> int:
        return self.qdata.shape[0]

    @property
    def in_features(self) -> int:
        if self.ndim == 1:  # flat alias
            return self.shape[0] // max(1, self.qdata.shape[0])
        return self.shape[0] if self.transposed else self.shape[1]

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
        **overrides,
    ) -> "Any4Tensor":
        """Quantize a high-precision (N, K) weight with `config` (default: Any4WeightOnlyConfig()),
        any of its fields overridden by keyword, e.g. `from_hp(w, codebook="nf4", group_size=64)`.
        The weight must already be validated (any4ao.validation.check_weight); the algorithm is in
        any4ao.codebooks.quantize."""
        config = dataclasses.replace(config or Any4WeightOnlyConfig(), **overrides)
        q = quantize_weight(weight, config, channel_weight)
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
        """Build from unpacked (N, K) codes and the per-row / per-group parameters."""
        n, k = codes.shape
        expected = {
            "lut": (n, 2**nbits),
            "scale": (n, num_groups(k, group_size)),
            "zero_point": (n, num_groups(k, group_size)),
        }
        for name, t in (("lut", lut), ("scale", scale), ("zero_point", zero_point)):
            if tuple(t.shape) != expected[name]:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {expected[name]}")
        if not (lut.dtype == scale.dtype == zero_point.dtype):
            raise ValueError(f"lut, scale, zero_point dtypes differ: {lut.dtype}, {scale.dtype}, {zero_point.dtype}")
        qdata = pack_codes(codes, nbits)
        assert qdata.shape[1] == packed_width(k, nbits)
        return cls(
            qdata,
            lut.contiguous(),
            scale.contiguous(),
            zero_point.contiguous(),
            nbits,
            [1, group_size],
            torch.Size([n, k]),
            kernel_preference=kernel_preference,
        )

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


torch.serialization.add_safe_globals([Any4Tensor])
