"""Model-level entry points on top of torchao's `quantize_`.

`quantize_(model, any4_weight_only(), filter_fn=any4ao.default_filter)` is the torchao way;
`quantize_model(model, config)` does the same with three extras: it skips lm_head, it validates
every selected layer before touching any (so a NaN in layer 20 leaves the model unchanged), and
it restores the original weights if quantization fails midway. It shows a progress bar.
"""

from typing import Callable, Optional

from torch import nn
from torchao.quantization import quantize_
from tqdm.auto import tqdm

from any4ao import config as _config
from any4ao.config import Any4WeightOnlyConfig
from any4ao.tensor.any4_tensor import Any4Tensor
from any4ao.validation import check_weight

# Output projections the paper leaves in high precision (transformers names them lm_head).
SKIPPED_BY_DEFAULT = ("lm_head", "output", "embed_out")


def default_filter(module: nn.Module, fqn: str) -> bool:
    """nn.Linear layers except the LM head, not yet quantized. Records the layer's name so that
    errors raised while quantizing it can name it."""
    selected = (
        isinstance(module, nn.Linear)
        and not isinstance(module.weight, Any4Tensor)
        and fqn.split(".")[-1] not in SKIPPED_BY_DEFAULT
    )
    if selected:
        _config.module_names[module] = fqn
    return selected


def quantize_model(
    model: nn.Module,
    config: Optional[Any4WeightOnlyConfig] = None,
    filter_fn: Callable[[nn.Module, str], bool] = default_filter,
    progress: bool = True,
) -> nn.Module:
    """Quantize `model` in place, all or nothing. Returns the model."""
    config = config or Any4WeightOnlyConfig()
    targets = [(fqn, m) for fqn, m in model.named_modules() if filter_fn(m, fqn)]
    for fqn, module in targets:  # validate everything before changing anything
        _config.module_names[module] = fqn
        check_weight(fqn, getattr(module, "weight", None))
    originals = {module: module.weight for _, module in targets}
    bar = tqdm(total=len(targets), desc=f"any4ao {config.codebook}", unit="layer", disable=not progress)

    def selected(module, fqn):
        if module in originals and filter_fn(module, fqn):
            bar.update(1)
            return True
        return False

    try:
        quantize_(model, config, filter_fn=selected)
    except BaseException:
        for module, weight in originals.items():
            module.weight = weight
        raise
    finally:
        bar.close()
    return model
