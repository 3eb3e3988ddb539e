"""Any4WeightOnlyConfig: what to quantize and how. The one place that holds the defaults.

The torchao handler that applies it (`quantize_(model, Any4WeightOnlyConfig())`) is in
`any4ao.quantize_api`; this module imports no tensor code, so the tensor subclass and the
codebooks can read settings from it without an import cycle.
"""

import enum
import numbers
import operator
from dataclasses import dataclass
from typing import Optional

import torch
from torchao.core.config import AOBaseConfig

from any4ao.calibration.activation_stats import ChannelImportance

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_GROUP, MAX_GROUP, GROUP_MULTIPLE = 16, 8192, 16
MAX_REFINE_ROUNDS = 20


class Codebook(str, enum.Enum):
    """The 16 (8, 4) values a code indexes. `any*` are learned per row; the rest are fixed grids."""

    ANY4 = "any4"
    ANY3 = "any3"
    ANY2 = "any2"
    INT4 = "int4"
    INT3 = "int3"
    INT2 = "int2"
    NF4 = "nf4"
    FP4 = "fp4"

    @property
    def bits(self) -> int:
        return int(self.value[-1])

    @property
    def kind(self) -> str:
        """'any', 'int', 'nf4' or 'fp4': which LUT family (any4ao.codebooks.quantize)."""
        return self.value[:-1] if self.value[:-1] in ("any", "int") else self.value

    @property
    def learned(self) -> bool:
        return self.kind == "any"


class Scaling(str, enum.Enum):
    """How a group of weights is mapped into the code domain."""

    AUTO = "auto"  # learned codebooks: both below (and absmax from nf4 and fp4), best kept per row
    MINMAX = "minmax"  # asymmetric, int4-style: [min, max] -> the grid's range (the paper's)
    ABSMAX = "absmax"  # symmetric: absmax -> the grid's largest magnitude (nf4 / fp4 style)


class ErrorFeedback(str, enum.Enum):
    """How codes are chosen once the LUTs and group scales are learned."""

    NONE = "none"  # nearest LUT entry per weight
    GPTQ = "gptq"  # column by column, each column's error fed back through the inverse Hessian


class Any4KernelPreference(str, enum.Enum):
    """Which matmul path an Any4Tensor takes on CUDA (torchao's name for the same choice). The class
    has a name of its own: torchao's config_from_dict looks an enum up by its class name in a set of
    modules, and torchao's own KernelPreference (no DEQUANTIZE) was found first in some processes, so
    checkpoints saved with "dequantize" failed to load at random."""

    AUTO = "auto"  # the fused LUT kernels where they apply (any4ao.kernels.selector), else DEQUANTIZE
    DEQUANTIZE = "dequantize"  # dequantize to the activation dtype, then cuBLAS / F.linear


KernelPreference = Any4KernelPreference  # the name this module exported first


def _enum(cls, value, field_name: str):
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(v.value for v in cls)
        raise ValueError(f"{field_name} must be one of {choices}; got {value!r}") from None


def _integer(value):
    """Integers of other types (numpy, torch scalars with __index__) as a Python int; anything else
    (bool included) unchanged, for the caller's check to refuse by name."""
    if isinstance(value, int):  # (bool is an int: returned as is, for _int_in to refuse)
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value


def _int_in(value, lo: int, hi: int, field_name: str) -> int:
    value = _integer(value)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{field_name} must be an int in [{lo}, {hi}], got {value!r}")
    return value


@dataclass
class Any4WeightOnlyConfig(AOBaseConfig):
    """Weight-only LUT quantization of linear layers.

    Args:
        codebook: "any4" (learned per-row LUT; "any3" / "any2" for fewer bits), or a fixed grid:
            "int4" (also int3 / int2), "nf4", "fp4".
        group_size: input channels per scale / zero group, a multiple of 16. Layers whose
            in_features it does not divide get a shorter last group (nothing is padded).
        calibration: ChannelImportance from `any4ao.calibrate(...)`: weights the k-means objective
            per input channel (the paper's one-sample calibration). Used by learned codebooks only.
        kmeans_iterations: Lloyd iterations per k-means run (stops early once codes stop changing).
        refine_rounds: rounds of refitting each group's scale and zero to the learned codes
            (weighted least squares), each followed by k-means again. Learned codebooks only.
        scaling: group scaling of the learned codebooks: "auto" (k-means from min/max + int grid,
            absmax + nf4 and absmax + fp4, the lowest weighted error kept per row: never worse than
            int4, nf4 or fp4 on any row), "minmax" (the paper's) or "absmax" alone. Fixed grids use
            their own (int: minmax, nf4 / fp4: absmax).
        error_feedback: "none", or "gptq": codes chosen in column order, each column's error fed
            back through the inverse of the layer-input Hessian (needs calibration recorded with
            `calibrate(..., hessian=True)`). Learned codebooks only.
        gptq_damp: GPTQ's dampening, a fraction of the Hessian's mean diagonal added to it.
        lut_dtype: dtype of LUT, scales and zero points (default: the weight's). The quantized weight
            then takes inputs of this dtype, as nn.Linear takes its weight's; the layer's bias and the
            rest of the model keep theirs, so run the model in this dtype (model.to(lut_dtype)).
        kernel_preference: "auto" (fused LUT kernels where they apply) or "dequantize".
        version: format version of the tensors this config makes (torchao's convention).
    """

    codebook: Codebook = Codebook.ANY4
    group_size: int = 128
    calibration: Optional[ChannelImportance] = None
    kmeans_iterations: int = 10
    refine_rounds: int = 2
    scaling: Scaling = Scaling.AUTO
    error_feedback: ErrorFeedback = ErrorFeedback.NONE
    gptq_damp: float = 0.01
    lut_dtype: Optional[torch.dtype] = None
    kernel_preference: KernelPreference = KernelPreference.AUTO
    version: int = 1

    def __post_init__(self):
        self.codebook = _enum(Codebook, self.codebook, "codebook")
        self.scaling = _enum(Scaling, self.scaling, "scaling")
        self.error_feedback = _enum(ErrorFeedback, self.error_feedback, "error_feedback")
        if isinstance(self.gptq_damp, numbers.Real) and not isinstance(self.gptq_damp, bool):
            self.gptq_damp = float(self.gptq_damp)  # numpy / torch scalars: stored (and saved) as a float
        if (
            isinstance(self.gptq_damp, bool)
            or not isinstance(self.gptq_damp, (int, float))
            or not (0 < self.gptq_damp <= 1)
        ):
            raise ValueError(f"gptq_damp must be a number in (0, 1], got {self.gptq_damp!r}")
        self.kernel_preference = _enum(KernelPreference, self.kernel_preference, "kernel_preference")
        self.group_size = _integer(self.group_size)
        if (
            not isinstance(self.group_size, int)
            or isinstance(self.group_size, bool)
            or self.group_size % GROUP_MULTIPLE
            or not MIN_GROUP <= self.group_size <= MAX_GROUP
        ):
            raise ValueError(
                f"group_size must be a multiple of {GROUP_MULTIPLE} between {MIN_GROUP} and {MAX_GROUP}, "
                f"got {self.group_size!r}"
            )
        self.kmeans_iterations = _int_in(self.kmeans_iterations, 0, 10_000, "kmeans_iterations")
        self.refine_rounds = _int_in(self.refine_rounds, 0, MAX_REFINE_ROUNDS, "refine_rounds")
        if self.lut_dtype is not None and self.lut_dtype not in FLOAT_DTYPES:
            raise ValueError(f"lut_dtype must be one of {FLOAT_DTYPES} or None, got {self.lut_dtype!r}")
        if self.calibration is not None and not isinstance(self.calibration, ChannelImportance):
            raise ValueError(
                f"calibration must be a ChannelImportance from any4ao.calibrate, got {type(self.calibration).__name__}"
            )
        if self.error_feedback == ErrorFeedback.GPTQ:
            if not self.codebook.learned:
                raise ValueError(
                    f"error_feedback='gptq' is for learned codebooks (any4/any3/any2), not {self.codebook.value}"
                )
            if self.calibration is not None and not self.calibration.has_hessian:
                raise ValueError(
                    "error_feedback='gptq' needs the layer-input Hessians: calibrate with any4ao.calibrate(..., hessian=True)"
                )
        if type(self.version) is not int or self.version != 1:  # (True == 1 and 1.0 == 1 are no versions)
            raise ValueError(f"Any4WeightOnlyConfig version {self.version!r} is not supported (this any4ao: 1)")
        # HF flows build this config after importing transformers: teach its torchao loader our
        # `lut` part then (any4ao/integrations/transformers_loading.py)
        from any4ao.integrations.transformers_loading import register_with_transformers_if_loaded

        register_with_transformers_if_loaded()

    @property
    def bits(self) -> int:
        return self.codebook.bits


def any4_weight_only(**kwargs) -> Any4WeightOnlyConfig:
    """Config for `torchao.quantization.quantize_`; same arguments as Any4WeightOnlyConfig."""
    return Any4WeightOnlyConfig(**kwargs)
