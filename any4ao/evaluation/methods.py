"""The methods `any4ao eval` compares. Every quantized method goes through torchao's `quantize_`
with an Any4WeightOnlyConfig (via any4ao.quantize_model, which skips lm_head) and the same group size."""

from dataclasses import dataclass
from typing import Optional

from any4ao.config import Any4WeightOnlyConfig

# name -> (codebook, calibrated, error feedback); "baseline" is the unquantized model.
METHODS = {
    "baseline": (None, False, "none"),
    "int4": ("int4", False, "none"),
    "fp4": ("fp4", False, "none"),
    "nf4": ("nf4", False, "none"),
    "any4": ("any4", False, "none"),
    "any4+cal": ("any4", True, "none"),
    "any4+gptq": ("any4", True, "gptq"),
    "any3+cal": ("any3", True, "none"),
    "any2+cal": ("any2", True, "none"),
}
DEFAULT_METHODS = ("baseline", "int4", "fp4", "nf4", "any4", "any4+cal", "any4+gptq")


@dataclass
class MethodSettings:
    group_size: int = 128
    kmeans_iterations: int = 10
    refine_rounds: int = 2
    lut_dtype: Optional[object] = None


def check_methods(names) -> None:
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {', '.join(map(repr, unknown))}; choose from {','.join(METHODS)}")


def validate_settings(names, settings: MethodSettings) -> None:
    """Build (and drop) the config of every quantized method in `names`: ValueError on a bad group
    size, iteration count etc., before any model is loaded."""
    check_methods(names)
    for codebook in sorted({METHODS[m][0] for m in names if METHODS[m][0] is not None}):
        Any4WeightOnlyConfig(
            codebook=codebook,
            group_size=settings.group_size,
            kmeans_iterations=settings.kmeans_iterations,
            refine_rounds=settings.refine_rounds,
            lut_dtype=settings.lut_dtype,
        )


def needs_calibration(name: str) -> bool:
    return METHODS[name][1]


def needs_hessian(name: str) -> bool:
    return METHODS[name][2] == "gptq"


def config_for(name: str, settings: MethodSettings, calibration=None) -> Optional[Any4WeightOnlyConfig]:
    codebook, calibrated, feedback = METHODS[name]
    if codebook is None:
        return None
    if calibrated and calibration is None:
        raise ValueError(f"method {name!r} needs calibration statistics")
    return Any4WeightOnlyConfig(
        codebook=codebook,
        group_size=settings.group_size,
        calibration=calibration if calibrated else None,
        error_feedback=feedback,
        kmeans_iterations=settings.kmeans_iterations,
        refine_rounds=settings.refine_rounds,
        lut_dtype=settings.lut_dtype,
    )
