"""Any4Tensor: a weight stored as packed codes + a per-row LUT + per-group scales and zeros.

    W[n, k] = lut[n, code[n, k]] * scales[n, k // G] + zeros[n, k // G]

The class holds data and a handful of constructors; the aten ops it supports live in
`any4ao.tensor.ops` and the matmul routing in `any4ao.tensor.linear`.
"""

import hashlib
from typing import List, Optional

import torch
from torchao.utils import TorchAOBaseTensor

from any4ao.codebooks.group_scaling import expand_groups, num_groups
from any4ao.codebooks.quantize import quantize_weight
from any4ao.tensor.packing import pack_codes, packed_width, unpack_codes

__all__ = ["Any4Tensor"]


def _gpu_kernels() -> bool:
    from any4ao.kernels.dispatch import kernels_loaded

    return kernels_loaded()


class Any4Tensor(TorchAOBaseTensor):
    """LUT-quantized 2-D weight (out_features N x in_features K).

    Tensor data:
        qdata:  (N, ceil(K / codes_per_byte)) uint8, packed codes (see any4ao.tensor.packing)
        lut:    (N, 2**nbits), the tensor's dtype; sorted per row
        scales: (N, ceil(K / G)), the tensor's dtype
        zeros:  (N, ceil(K / G)), the tensor's dtype
    Attributes:
        nbits:      2, 3 or 4
        block_size: [1, G], torchao's description of the group granularity
        shape:      the logical shape, (N, K), or (K, N) when `transposed`
        transposed: set by `.t()`; the data stays in (N, K) orientation
    """

    tensor_data_names = ["qdata", "lut", "scales", "zeros"]
    tensor_attribute_names = ["nbits", "block_size", "shape"]
    optional_tensor_attribute_names = ["transposed"]

    def __new__(cls, qdata, lut, scales, zeros, nbits, block_size, shape, transposed=False):
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, device=qdata.device, dtype=scales.dtype, requires_grad=False
        )

    def __init__(
        self,
        qdata: torch.Tensor,
        lut: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        nbits: int,
        block_size: List[int],
        shape: torch.Size,
        transposed: Optional[bool] = False,
    ):
        super().__init__()
        self.qdata = qdata
        self.lut = lut
        self.scales = scales
        self.zeros = zeros
        self.nbits = nbits
        self.block_size = list(block_size)
        self.transposed = bool(transposed)
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
            "scales": (n, num_groups(k, self.group_size)),
            "zeros": (n, num_groups(k, self.group_size)),
        }
        for name, want in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != want:
                fail(f"{name} has shape {got}, expected {want} for a {n}x{k} weight, nbits={self.nbits}, "
                     f"group_size={self.group_size}")
        if not (self.lut.dtype == self.scales.dtype == self.zeros.dtype) or not self.lut.is_floating_point():
            fail(f"lut, scales, zeros dtypes {self.lut.dtype}, {self.scales.dtype}, {self.zeros.dtype} must be one float dtype")
        devices = {t.device for t in (self.qdata, self.lut, self.scales, self.zeros)}
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
        from any4ao.tensor.fsdp import pre_all_gather

        return pre_all_gather(self, mesh)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        from any4ao.tensor.fsdp import post_all_gather

        return post_all_gather(self, all_gather_outputs, metadata, param_dtype, out=out)

    def _quantization_type(self):
        return (
            f"shape={tuple(self.shape)}, nbits={self.nbits}, group_size={self.group_size}, "
            f"transposed={self.transposed}, device={self.device}, dtype={self.dtype}"
        )

    @classmethod
    def from_hp(
        cls,
        weight: torch.Tensor,
        nbits: int = 4,
        group_size: int = 128,
        codebook: str = "any",
        channel_weight: Optional[torch.Tensor] = None,
        iterations: int = 10,
        dtype: Optional[torch.dtype] = None,
        refine_rounds: int = 2,
        scaling: str = "minmax",
    ) -> "Any4Tensor":
        """Quantize a high-precision (N, K) weight. Inputs must already be validated
        (any4ao.validation.check_weight); see any4ao.codebooks.quantize for the algorithm."""
        q = quantize_weight(weight, nbits, group_size, codebook, channel_weight, iterations, dtype, refine_rounds, scaling)
        return cls.from_codes(q.codes, q.lut, q.scales, q.zeros, nbits, group_size)

    @classmethod
    def from_codes(cls, codes, lut, scales, zeros, nbits: int, group_size: int) -> "Any4Tensor":
        """Build from unpacked (N, K) codes and the per-row / per-group parameters."""
        n, k = codes.shape
        expected = {
            "lut": (n, 2**nbits),
            "scales": (n, num_groups(k, group_size)),
            "zeros": (n, num_groups(k, group_size)),
        }
        for name, t in (("lut", lut), ("scales", scales), ("zeros", zeros)):
            if tuple(t.shape) != expected[name]:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {expected[name]}")
        if not (lut.dtype == scales.dtype == zeros.dtype):
            raise ValueError(f"lut, scales, zeros dtypes differ: {lut.dtype}, {scales.dtype}, {zeros.dtype}")
        qdata = pack_codes(codes, nbits)
        assert qdata.shape[1] == packed_width(k, nbits)
        return cls(qdata, lut.contiguous(), scales.contiguous(), zeros.contiguous(), nbits, [1, group_size], torch.Size([n, k]))

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
                self.qdata, self.lut, self.scales, self.zeros, self.nbits, self.group_size, k, output_dtype
            )
            return w.t() if self.transposed else w
        compute = torch.float64 if output_dtype == torch.float64 else torch.float32
        codes = self.codes().long()
        k = codes.shape[1]
        values = torch.gather(self.lut.to(compute), 1, codes)
        w = values * expand_groups(self.scales.to(compute), k, self.group_size) + expand_groups(
            self.zeros.to(compute), k, self.group_size
        )
        w = w.to(output_dtype)
        return w.t() if self.transposed else w

    def __tensor_flatten__(self):
        """(inner tensor names, metadata), as torchao's generic version returns them, without its
        hasattr checks and comprehensions: a compiled model calls this twice per Any4Tensor on
        every call (dynamo's metadata guard, AOT autograd's input unwrapping): for a 224-linear Llama
        that took 2.25 ms of host time per call, now 0.62 ms (cProfile, 2-core CPU). Tested equal
        to the generic version."""
        return list(self.tensor_data_names), {"nbits": self.nbits, "block_size": self.block_size,
                                              "shape": self.shape, "transposed": self.transposed}

    def _stable_hash_for_caching(self) -> str:
        """Key for AOT autograd's compile cache (torch's extension point for tensor subclasses):
        metadata only, the same across processes. The codes, LUT, scales and zeros are graph inputs,
        so their values do not change the compiled code; their shapes, strides and dtypes do."""
        parts = [type(self).__qualname__, tuple(self.shape), str(self.dtype), self.requires_grad, self.nbits,
                 tuple(self.block_size), self.transposed]
        for name in self.tensor_data_names:
            t = getattr(self, name)
            parts.append((name, tuple(t.shape), tuple(t.stride()), str(t.dtype), t.device.type))
        return hashlib.blake2b(repr(parts).encode(), digest_size=16).hexdigest()

    def storage_bytes(self) -> int:
        """Bytes held by every inner tensor (what the weight really costs in memory)."""
        return sum(t.numel() * t.element_size() for t in (self.qdata, self.lut, self.scales, self.zeros))

    def bits_per_weight(self) -> float:
        return 8.0 * self.storage_bytes() / self.numel()


# Ops are registered on import of this module, so the class is always usable once imported.
from any4ao.tensor import ops as _ops  # noqa: E402,F401

torch.serialization.add_safe_globals([Any4Tensor])
