"""Any4WeightOnlyConfig and its torchao handler: `quantize_(model, any4_weight_only())`."""

import re
import weakref
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from any4ao.calibration.activation_stats import ChannelImportance
from any4ao.tensor.any4_tensor import Any4Tensor
from any4ao.validation import check_channel_weight, check_learning, check_settings, check_weight

_CODEBOOK = re.compile(r"^(any|int|nf|fp)(\d)?$")

# Filled by any4ao.filters when it selects a module, so errors can name the layer by its path.
module_names: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def parse_codebook(codebook: str, nbits: Optional[int]) -> Tuple[str, int]:
    """'any4' -> ('any', 4); 'any' + nbits=3 -> ('any', 3); 'nf4' -> ('nf4', 4)."""
    m = _CODEBOOK.match(codebook) if isinstance(codebook, str) else None
    if m is None:
        raise ValueError(f"codebook must be one of any4/any3/any2, int4/int3/int2, nf4, fp4; got {codebook!r}")
    kind, digits = m.group(1), m.group(2)
    bits = int(digits) if digits else (nbits if nbits is not None else 4)
    if nbits is not None and nbits != bits:
        raise ValueError(f"codebook {codebook!r} is {bits}-bit but nbits={nbits} was given")
    if kind in ("nf", "fp"):
        if bits != 4:
            raise ValueError(f"codebook {codebook!r}: only nf4 and fp4 exist")
        return kind + "4", 4
    return kind, bits


@dataclass
class Any4WeightOnlyConfig(AOBaseConfig):
    """Weight-only LUT quantization of linear layers.

    Args:
        codebook: "any4" (learned per-row LUT; "any3"/"any2" for fewer bits), "int4", "nf4", "fp4".
        nbits: optional; must agree with the codebook's bit width if given.
        group_size: input channels per scale/zero group (multiple of 16). Layers whose in_features
            it does not divide get a shorter last group (no padding is stored).
        calibration: ChannelImportance from `any4ao.calibrate(...)`; weights the k-means objective
            per input channel (the paper's one-sample calibration). Ignored by fixed codebooks.
        kmeans_iterations: Lloyd iterations per k-means run (stops early once codes stop changing).
        refine_rounds: rounds of refitting each group's scale and zero to the learned codes by
            weighted least squares, each followed by k-means again (any codebooks only). 2 rounds
            cut SmolLM2's perplexity increase by about 40% (benchmarks/results/ablation-*.md).
        scaling: "minmax" (asymmetric, int4-style, the paper's) or "absmax" (symmetric,
            started from the NF grid) group scaling for the learned codebooks.
        lut_dtype: dtype of LUT, scales and zeros, i.e. of the quantized tensor (default: the weight's).
    """

    codebook: str = "any4"
    nbits: Optional[int] = None
    group_size: int = 128
    calibration: Optional[ChannelImportance] = None
    kmeans_iterations: int = 10
    refine_rounds: int = 2
    scaling: str = "minmax"
    lut_dtype: Optional[torch.dtype] = None

    def __post_init__(self):
        # Underscored: torchao's config serializer (used by transformers' TorchAoConfig) skips them.
        self._codebook_kind, self._bits = parse_codebook(self.codebook, self.nbits)
        check_settings(self.bits, self.group_size, self.lut_dtype, self.kmeans_iterations)
        check_learning(self.scaling, self.refine_rounds)
        if self.calibration is not None and not isinstance(self.calibration, ChannelImportance):
            raise ValueError(f"calibration must be a ChannelImportance from any4ao.calibrate, got {type(self.calibration)}")


    @property
    def codebook_kind(self) -> str:
        return self._codebook_kind

    @property
    def bits(self) -> int:
        return self._bits


def any4_weight_only(**kwargs) -> Any4WeightOnlyConfig:
    """Config for `torchao.quantization.quantize_`; same arguments as Any4WeightOnlyConfig."""
    return Any4WeightOnlyConfig(**kwargs)


any4 = any4_weight_only


def _layer_name(module: nn.Module) -> str:
    if module in module_names:
        return module_names[module]
    return f"{type(module).__name__}(in_features={getattr(module, 'in_features', '?')}, out_features={getattr(module, 'out_features', '?')})"


def quantize_module_weight(module: nn.Module, config: Any4WeightOnlyConfig, parameter_name: str = "weight") -> Any4Tensor:
    """Validate and quantize one module's weight; returns the new tensor without installing it."""
    name = _layer_name(module)
    weight = getattr(module, parameter_name, None)
    if weight is None:
        raise ValueError(f"layer {name!r} has no parameter {parameter_name!r}")
    check_weight(name, weight)
    channel_weight = None
    if config.calibration is not None and config.codebook_kind == "any":
        channel_weight = config.calibration.for_module(module)
        if channel_weight is None:
            raise ValueError(
                f"layer {name!r} has no calibration statistics: it was not called during calibration "
                f"(or the statistics belong to another model)"
            )
        check_channel_weight(name, channel_weight, weight)
        channel_weight = channel_weight.to(weight.device)
    return Any4Tensor.from_hp(
        weight.detach(),
        nbits=config.bits,
        group_size=config.group_size,
        codebook=config.codebook_kind,
        channel_weight=channel_weight,
        iterations=config.kmeans_iterations,
        refine_rounds=config.refine_rounds,
        scaling=config.scaling,
        dtype=config.lut_dtype or weight.dtype,
    )


@register_quantize_module_handler(Any4WeightOnlyConfig)
def _any4_weight_only_transform(module: nn.Module, config: Any4WeightOnlyConfig, *, parameter_name: str = "weight") -> nn.Module:
    """Replace `module.<parameter_name>` in place by an Any4Tensor parameter (no module swap)."""
    new_weight = quantize_module_weight(module, config, parameter_name)
    setattr(module, parameter_name, nn.Parameter(new_weight, requires_grad=False))
    return module
