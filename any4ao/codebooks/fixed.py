"""Fixed codebooks (int, nf4, fp4) expressed as lookup tables.

Every format in any4ao is "codes index a per-row LUT, then scale and zero per group", so a fixed
codebook is just a LUT that is the same for every row, and one kernel serves all of them.
"""

import torch

# QLoRA's NF4 (Dettmers et al., 2023): quantiles of N(0, 1) normalised to [-1, 1], with an exact 0.
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# OCP MX FP4 (e2m1) magnitudes; the 16 codes are +/- these (two zeros).
FP4_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_E2M1_VALUES = tuple(-m for m in reversed(FP4_E2M1_MAGNITUDES)) + FP4_E2M1_MAGNITUDES


def int_grid(nbits: int) -> torch.Tensor:
    """Uniform asymmetric grid 0 .. 2**nbits - 1 (what int4 uses after min/max scaling)."""
    return torch.arange(2**nbits, dtype=torch.float32)


def fixed_lut(codebook: str, nbits: int) -> torch.Tensor:
    """The 1-D, sorted LUT of a fixed codebook."""
    if codebook == "int":
        return int_grid(nbits)
    if codebook == "nf4":
        if nbits != 4:
            raise ValueError(f"codebook 'nf4' has 16 values and needs nbits=4, got nbits={nbits}")
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    if codebook == "fp4":
        if nbits != 4:
            raise ValueError(f"codebook 'fp4' has 16 codes and needs nbits=4, got nbits={nbits}")
        return torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32)
    raise ValueError(f"unknown fixed codebook {codebook!r}")


def fixed_codebook_of(lut: torch.Tensor, nbits: int):
    """The fixed codebook ("int4", "nf4", ...) whose grid is every row of `lut` (N, 2**nbits), or None
    (learned LUTs; a tensor that says nothing about its codebook, e.g. after a copy, is named by this)."""
    if lut.is_meta or lut.dim() != 2 or lut.shape[1] != 2**nbits:
        return None
    for kind in ("int", "nf4", "fp4") if nbits == 4 else ("int",):
        grid = fixed_lut(kind, nbits).to(lut.device)
        # within bf16's rounding: a LUT stored in bf16 and cast to fp16 (model.half()) is still the grid
        if torch.allclose(lut.float(), grid.expand_as(lut), rtol=2**-8, atol=0):
            return f"int{nbits}" if kind == "int" else kind
    return None
