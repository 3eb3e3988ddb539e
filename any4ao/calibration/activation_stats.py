"""Single-sample calibration: per-input-channel activation statistics of every linear layer.

The any4 paper weights the k-means objective of each layer by how large that layer's inputs are,
measured on one calibration prompt. Forward pre-hooks accumulate, per input channel k, the mean of
x_k^2 ("square", the default: the diagonal of E[x x^T], so the weighted k-means objective is the
layer's output error E||(W - W_hat) x||^2 when channels are uncorrelated) or of |x_k| ("abs").
On SmolLM2-135M "square" gives clearly lower perplexity (benchmarks/results/ablation-*.md).

With `hessian=True` the full second moment E[x x^T] (K x K, float32, one per layer) is kept as
well, for GPTQ's error feedback, with what its shrinkage needs (2 x 1.2 GB per decoder block of
Llama-3-8B). One sample is a few hundred tokens, fewer than many layers' input width, so the
sample's E[x x^T] is rank-deficient: GPTQ fed back through it fits that sample's noise. On SmolLM2
(502 calibration tokens, K = 576 / 1536) it cut the calibration tokens' output error 3.5x and doubled
the held-out one (benchmarks/results/gptq-shrinkage-smollm2-g128.md). `hessian_for` therefore returns
it shrunk toward its diagonal, S* = (1 - l) S + l diag(S), with l = max(K / (K + T), l_SS): K
pseudo-observations of the diagonal target against T tokens, or the Schafer-Strimmer (2005) estimate
from the same tokens (the summed variance of the off-diagonal estimates over their summed squares)
where that is larger.
"""

import contextlib
import weakref
from importlib import resources
from typing import Callable, Dict, Iterator, Optional

import torch
from torch import nn

STATISTICS = ("abs", "square")


def default_calibration_text() -> str:
    """The calibration prompt shipped with the package (any4ao/data/calibration.txt)."""
    return resources.files("any4ao.data").joinpath("calibration.txt").read_text(encoding="utf-8")


CALIBRATION_MAX_TOKENS = 2048  # calibrate's default cut of its one sample


class ChannelImportance:
    """Per-input-channel importance of each recorded linear layer, keyed by module identity."""

    def __init__(self, statistic: str = "square", hessian: bool = False):
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
        if not isinstance(hessian, bool):  # "no" would be truthy: K x K matrices per layer, unasked for
            raise TypeError(f"hessian must be a bool, got {hessian!r}")
        self.statistic = statistic
        self.has_hessian = hessian
        self._second_moments: "weakref.WeakKeyDictionary[nn.Module, torch.Tensor]" = weakref.WeakKeyDictionary()
        self._fourth_moments: "weakref.WeakKeyDictionary[nn.Module, torch.Tensor]" = weakref.WeakKeyDictionary()
        self._sums: "weakref.WeakKeyDictionary[nn.Module, torch.Tensor]" = weakref.WeakKeyDictionary()
        self._counts: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()
        self.names: Dict[str, nn.Module] = {}
        self._token_mask: Optional[torch.Tensor] = None  # (batch, tokens) bool while calibrate runs with a mask

    def _record(self, module: nn.Module, x: torch.Tensor) -> None:
        x = x.detach()
        mask = self._token_mask
        if mask is not None:
            if tuple(x.shape[:-1]) != tuple(mask.shape):  # e.g. an MoE expert's routed tokens
                name = self.name_of(module) or type(module).__name__
                raise ValueError(
                    f"calibrate: the inputs of {name!r} have shape {tuple(x.shape)}, which the attention mask "
                    f"{tuple(mask.shape)} does not index (batch, tokens, features), so padding cannot be left out "
                    "there; calibrate without padding (one sample, or equal lengths) instead"
                )
            x = x[mask]
        x = x.reshape(-1, x.shape[-1])
        if self.has_hessian:
            xf = x.float()
            x2 = xf.square()
            self._second_moments[module] = self._second_moments.get(module, 0) + xf.T @ xf
            self._fourth_moments[module] = self._fourth_moments.get(module, 0) + x2.T @ x2
        x = x.double()
        stat = x.abs() if self.statistic == "abs" else x.square()
        self._sums[module] = self._sums.get(module, 0) + stat.sum(0)
        self._counts[module] = self._counts.get(module, 0) + x.shape[0]

    def merged(self, groups) -> "ChannelImportance":
        """A copy in which every module of each group (layers sharing one weight, e.g. a tied
        embedding and LM head called on different inputs) holds the group's pooled statistics:
        the shared weight is quantized once, for all of its inputs, not for the first layer's."""
        out = ChannelImportance(self.statistic, self.has_hessian)
        out.names = dict(self.names)
        tables = ("_second_moments", "_fourth_moments", "_sums", "_counts")
        for table in tables:
            getattr(out, table).update(getattr(self, table))
        for group in groups:
            for table in tables:
                mine = getattr(self, table)
                values = [mine[m] for m in group if m in mine]
                if values:
                    total = values[0]
                    for v in values[1:]:
                        total = total + v
                    for m in group:
                        getattr(out, table)[m] = total
        return out

    def shrinkage_for(self, module: nn.Module) -> Optional[float]:
        """The intensity l in [0, 1] with which hessian_for shrinks E[x x^T] toward its diagonal."""
        if module not in self._second_moments:
            return None
        t = self._counts[module]
        k = self._second_moments[module].shape[0]
        if t < 2:
            return 1.0
        return max(k / (k + t), self._estimated_shrinkage(module, t))

    def _estimated_shrinkage(self, module: nn.Module, t: int) -> float:
        s = self._second_moments[module].double() / t
        # variance of each entry's estimate: (E[x_i^2 x_j^2] - E[x_i x_j]^2) / (t - 1)
        var = (self._fourth_moments[module].double() / t - s.square()).clamp_min(0) / (t - 1)
        off = ~torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
        denominator = float(s[off].square().sum())
        if denominator <= 0:
            return 1.0
        return min(1.0, max(0.0, float(var[off].sum()) / denominator))

    def hessian_for(self, module: nn.Module) -> Optional[torch.Tensor]:
        """(in_features, in_features) float32 E[x x^T] of the module's inputs shrunk toward its
        diagonal (see the module docstring), or None if the module was never called or the
        statistics were recorded without hessian=True."""
        if module not in self._second_moments or not self._counts.get(module):  # never called, or on no token
            return None
        s = self._second_moments[module] / self._counts[module]
        shrink = self.shrinkage_for(module)
        return (1 - shrink) * s + shrink * torch.diag(torch.diagonal(s))

    def for_module(self, module: nn.Module, normalized: bool = False) -> Optional[torch.Tensor]:
        """(in_features,) float32 mean statistic, or None if the module was never called (or on no token).
        normalized: divided by its maximum in float64 first (what quantization uses: the k-means
        objective does not depend on the scale, and mean x^2 of activations near 1e-25 underflows
        float32 to all zeros). All-zero statistics stay all zero (and are rejected by quantization)."""
        if module not in self._sums or not self._counts.get(module):  # never called, or on no token (MoE)
            return None
        mean = self._sums[module] / self._counts[module]
        if normalized:
            top = mean.max() if mean.numel() else mean.new_zeros(())
            if bool(torch.isfinite(top)) and bool(top > 0):
                mean = mean / top
        return mean.float()

    def name_of(self, module: nn.Module) -> Optional[str]:
        """The module's path in the model it was recorded in (for error messages), or None."""
        return next((fqn for fqn, m in self.names.items() if m is module), None)

    def tokens_seen(self, module: nn.Module) -> int:
        return self._counts.get(module, 0)

    def __len__(self) -> int:
        return len(self._sums)


def _is_linear(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear)


def _recorder(stats: ChannelImportance):
    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.get("input")  # nn.Linear called as lin(input=x) too
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"calibrate: a {type(module).__name__} was called without an input tensor")
        stats._record(module, x)

    return hook


def input_embeddings(model: nn.Module) -> Optional[nn.Module]:
    """The model's token embedding, where it exposes one (transformers' get_input_embeddings)."""
    getter = getattr(model, "get_input_embeddings", None)
    return getter() if callable(getter) else None


def vocabulary_size(model: nn.Module) -> Optional[int]:
    """The ids the model accepts: the smaller of config.vocab_size and the input embedding's rows
    (they can disagree; an id past either one is out of the model's range), None if neither is known."""
    sizes = []
    config_vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if type(config_vocab) is int:
        sizes.append(config_vocab)
    embeddings = input_embeddings(model)
    if type(getattr(embeddings, "num_embeddings", None)) is int:
        sizes.append(embeddings.num_embeddings)
    return min(sizes) if sizes else None


def context_length(model: nn.Module) -> Optional[int]:
    """config.max_position_embeddings where the model declares a positive one."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return positions if type(positions) is int and positions > 0 else None


@contextlib.contextmanager
def record_channel_importance(
    model: nn.Module,
    statistic: str = "square",
    filter_fn: Callable[[nn.Module, str], bool] = _is_linear,
    hessian: bool = False,
    token_mask: Optional[torch.Tensor] = None,
) -> Iterator[ChannelImportance]:
    """Within the block, every forward of a selected layer adds to the statistics; token_mask
    (batch, tokens) bool: only those positions of each layer's inputs count. The hooks (and the
    mask) are removed on exit, also when the block raises."""
    stats = ChannelImportance(statistic, hessian)
    stats._token_mask = token_mask
    handles = []
    try:
        for fqn, module in model.named_modules():
            if filter_fn(module, fqn):
                stats.names[fqn] = module
                handles.append(module.register_forward_pre_hook(_recorder(stats), with_kwargs=True))
        yield stats
    finally:
        stats._token_mask = None
        for h in handles:
            h.remove()


def random_token_ids(model: nn.Module, tokens: int = 600, seed: int = 0) -> torch.Tensor:
    """(1, tokens) token ids drawn uniformly from the model's vocabulary with a fixed seed: a
    calibration sample that needs no text or tokenizer. Past the embedding, the activations of
    random ids still carry the model's own per-channel scales (norm weights, outlier channels),
    which is what the k-means weights need; measured against text and against no calibration in
    benchmarks/results/eval-random-calibration-NOTE.md."""
    if type(tokens) is not int or tokens < 1:
        raise ValueError(f"random_token_ids: tokens={tokens!r}, expected a positive int")
    vocab = vocabulary_size(model)
    if vocab is None or vocab < 1:
        raise ValueError(
            f"random_token_ids: cannot tell the vocabulary size of the {type(model).__name__} "
            "(no config.vocab_size, no input embedding); pass input_ids to calibrate instead"
        )
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, tokens), generator=generator)


@torch.no_grad()
def calibrate(
    model: nn.Module,
    tokenizer=None,
    text: Optional[str] = None,
    input_ids: Optional[torch.Tensor] = None,
    max_tokens: int = CALIBRATION_MAX_TOKENS,
    statistic: str = "square",
    filter_fn: Callable[[nn.Module, str], bool] = _is_linear,
    hessian: bool = False,
    attention_mask: Optional[torch.Tensor] = None,
) -> ChannelImportance:
    """Run one calibration sample through a causal LM and return per-layer channel importance.

    Pass `input_ids`, or a `tokenizer` (and optionally `text`, default: the shipped prompt). The
    sample is cut to max_tokens and to config.max_position_embeddings, and runs in eval mode (each
    module's training flag is restored after). hessian: also keep each layer's full E[x x^T] (for
    error_feedback="gptq"). attention_mask: (batch, tokens) of 0/1 for a padded batch: passed to the
    model, and the padding positions are left out of the statistics."""
    if input_ids is None:
        if tokenizer is None:
            raise ValueError("calibrate needs either input_ids or a tokenizer")
        if text is not None and (not isinstance(text, str) or not text.strip()):
            raise ValueError(f"calibrate: text must be non-empty text (None: the shipped prompt), got {text!r}")
        input_ids = tokenizer(default_calibration_text() if text is None else text, return_tensors="pt").input_ids
    if type(max_tokens) is not int or max_tokens < 1:
        raise ValueError(f"calibrate: max_tokens={max_tokens!r}, expected a positive int")
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.dim() != 2
        or input_ids.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError(
            "calibrate: input_ids must be a 2-D integer tensor (batch, tokens), got "
            + (
                f"{input_ids.dtype} {tuple(input_ids.shape)}"
                if isinstance(input_ids, torch.Tensor)
                else repr(input_ids)
            )
        )
    if input_ids.numel() == 0:
        raise ValueError(f"calibrate: input_ids {tuple(input_ids.shape)} holds no token")
    vocab = vocabulary_size(model)
    if vocab is not None and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        raise ValueError(
            f"calibrate: token ids must lie in [0, {vocab}) (the model's vocabulary: the smaller of "
            "config.vocab_size and its input embedding's rows)"
        )
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"calibrate: attention_mask must be a tensor of the input_ids' shape {tuple(input_ids.shape)}, got "
                + (
                    f"{tuple(attention_mask.shape)}"
                    if isinstance(attention_mask, torch.Tensor)
                    else repr(attention_mask)
                )
            )
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("calibrate: attention_mask must hold only 0 (padding) and 1 (token)")
    positions = context_length(model)  # a learned position table (OPT, GPT-2) has no row past it
    cut = min(max_tokens, positions or max_tokens)
    device = next(model.parameters()).device
    input_ids = input_ids[:, :cut].to(device)
    kwargs = {}
    if attention_mask is not None:
        attention_mask = attention_mask[:, :cut].to(device)
        if not bool(attention_mask.any()):
            raise ValueError("calibrate: attention_mask leaves no token (after the cut to max_tokens)")
        kwargs["attention_mask"] = attention_mask
    training = {module: module.training for module in model.modules()}
    model.eval()  # dropout off: the statistics are of the model as it runs, and the global RNG is untouched
    try:
        mask = None if attention_mask is None else attention_mask.bool()
        with record_channel_importance(model, statistic, filter_fn, hessian, mask) as stats:
            model(input_ids, **kwargs)
    finally:
        for module, mode in training.items():
            module.training = mode
    if len(stats) == 0:
        raise ValueError("calibration recorded no layer: does filter_fn select any module that the forward calls?")
    return stats
