"""The methods `any4ao eval` compares. Every quantized method goes through torchao's `quantize_`
with an Any4WeightOnlyConfig (via any4ao.quantize_model, which skips lm_head) and the same group size."""

from dataclasses import dataclass
from typing import Optional

from any4ao.config import Any4WeightOnlyConfig

# name -> (codebook, calibrated); "baseline" is the unquantized model.
METHODS = {
    "baseline": (None, False),
    "int4": ("int4", False),
    "fp4": ("fp4", False),
    "nf4": ("nf4", False),
    "any4": ("any4", False),
    "any4+cal": ("any4", True),
    "any3+cal": ("any3", True),
    "any2+cal": ("any2", True),
}
DEFAULT_METHODS = tuple(METHODS)


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


def config_for(name: str, settings: MethodSettings, calibration=None) -> Optional[Any4WeightOnlyConfig]:
    codebook, calibrated = METHODS[name]
    if codebook is None:
        return None
    if calibrated and calibration is None:
        raise ValueError(f"method {name!r} needs calibration statistics")
    return Any4WeightOnlyConfig(
        codebook=codebook,
        group_size=settings.group_size,
        calibration=calibration if calibrated else None,
        kmeans_iterations=settings.kmeans_iterations,
        refine_rounds=settings.refine_rounds,
        lut_dtype=settings.lut_dtype,
    )
