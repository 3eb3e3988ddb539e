"""Perplexity of a causal LM over fixed or sliding token windows.

Protocol (the defaults of `any4ao eval`):
  1. Tokenize the whole text once, with the model's tokenizer, adding no special tokens.
  2. BOS: if the tokenizer adds a BOS token by default (tokenizer("x").input_ids starts with
     bos_token_id: Gemma does, SmolLM2 and Qwen2.5 do not), every window starts with that BOS, as
     the lm-eval harness does for rolling log-likelihoods. A window is then BOS + window - 1 text
     tokens, and the BOS is context only (never a target). Without it, window text tokens.
  3. With L text tokens per window, window i covers text tokens [i * stride, i * stride + L).
     Every window is evaluated on its own (no state carried between windows).
  4. The first window scores every text token it can predict (L - 1 without BOS, L with it, the
     first predicted from the BOS); later windows score only the text tokens not scored before
     (the last `stride` ones), with up to L - stride text tokens of left context. stride == L gives
     non-overlapping windows (the default).
  5. Perplexity = exp(total NLL / scored tokens). With max_windows, only the first windows are used.
"""

import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # summed negative log-likelihood, nats
    tokens: int  # number of scored tokens
    windows: int
    window_nll: List[float] = field(default_factory=list)  # summed NLL per window, nats
    window_tokens: List[int] = field(default_factory=list)  # scored tokens per window


def progress_bar(iterable, enabled: bool, **kwargs):
    """tqdm over `iterable` when enabled (tqdm is imported only then: it comes with the eval extra)."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **kwargs)


def default_bos(tokenizer) -> Optional[int]:
    """The BOS id the tokenizer prepends by default, else None. Decided from the ids, not from
    `add_bos_token` (Gemma's tokenizer re-saved by transformers reports False but still adds it)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("Hello world").input_ids
    return bos if len(ids) > 0 and ids[0] == bos else None


def token_windows(
    input_ids: torch.Tensor,
    window: int,
    stride: Optional[int] = None,
    max_windows: Optional[int] = None,
    bos_token_id: Optional[int] = None,
) -> List[Tuple[torch.Tensor, int]]:
    """[(window_ids (1, window), number of leading positions that are context only)] following the
    protocol above; with bos_token_id every window is that BOS plus window - 1 text tokens."""
    bos = bos_token_id is not None
    if window < 2 + bos:
        raise ValueError(f"window must be >= {2 + bos} tokens, got {window}")
    span = window - bos  # text tokens per window
    stride = span if stride is None else stride
    if not 1 <= stride <= span:
        raise ValueError(f"stride must be in [1, {span}] (the text tokens per window), got {stride}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or None, got {max_windows}")
    ids = input_ids.reshape(-1)
    if ids.numel() < span:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {span}")
    prefix = ids.new_tensor([bos_token_id]) if bos else ids[:0]
    out = []
    for start in range(0, ids.numel() - span + 1, stride):
        if max_windows is not None and len(out) >= max_windows:
            break
        skip = (0 if start == 0 else span - stride) + bos
        out.append((torch.cat([prefix, ids[start : start + span]])[None], skip))
    return out


def _first_scored(skip: int) -> int:
    """Position p predicts token p + 1, so a window whose first `skip` tokens are context only
    scores the predictions from position skip - 1 on."""
    return max(skip - 1, 0)


def scored_tokens(windows) -> int:
    """How many next-token predictions `perplexity` scores over `windows`."""
    return sum(ids.shape[1] - 1 - _first_scored(skip) for ids, skip in windows)


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows, progress: bool = True, desc: str = "perplexity") -> PerplexityResult:
    device = next(model.parameters()).device
    window_nll, window_tokens = [], []
    for ids, skip in progress_bar(windows, progress, desc=desc, unit="window", leave=False):
        ids = ids.to(device)
        logits = model(ids).logits[0, :-1].float()
        targets = ids[0, 1:]
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        scored = nll[_first_scored(skip) :]
        if not torch.isfinite(scored).all():
            raise FloatingPointError("the model produced non-finite log-likelihoods (NaN/Inf logits)")
        window_nll.append(scored.double().sum().item())
        window_tokens.append(scored.numel())
    total_nll, total_tokens = math.fsum(window_nll), sum(window_tokens)
    return PerplexityResult(
        math.exp(total_nll / total_tokens), total_nll, total_tokens, len(windows), window_nll, window_tokens
    )
