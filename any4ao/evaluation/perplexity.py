"""Perplexity of a causal LM over fixed or sliding token windows.

Protocol (the defaults of `any4ao eval`):
  1. Tokenize the whole text once, with the model's tokenizer, adding no special tokens.
  2. Window i covers tokens [i * stride, i * stride + window). Every window is evaluated on its own
     (no state carried between windows).
  3. The first window scores all its window - 1 next-token predictions; later windows score only the
     tokens not scored before (the last `stride` ones), each with up to window - stride tokens of
     left context. stride == window gives non-overlapping windows.
  4. Perplexity = exp(total NLL / scored tokens). With max_windows, only the first windows are used.
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from tqdm.auto import tqdm


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # summed negative log-likelihood, nats
    tokens: int  # number of scored tokens
    windows: int


def token_windows(
    input_ids: torch.Tensor, window: int, stride: Optional[int] = None, max_windows: Optional[int] = None
) -> List[Tuple[torch.Tensor, int]]:
    """[(window_ids (1, L), number of leading positions not scored)] following the protocol above."""
    stride = window if stride is None else stride
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    ids = input_ids.reshape(-1)
    if ids.numel() < window:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {window}")
    out = []
    for start in range(0, ids.numel() - window + 1, stride):
        if max_windows is not None and len(out) >= max_windows:
            break
        skip = 0 if start == 0 else window - stride
        out.append((ids[start : start + window][None], skip))
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
    total_nll, total_tokens = 0.0, 0
    for ids, skip in tqdm(windows, desc=desc, unit="window", disable=not progress, leave=False):
        ids = ids.to(device)
        logits = model(ids).logits[0, :-1].float()
        targets = ids[0, 1:]
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        scored = nll[_first_scored(skip) :]
        if not torch.isfinite(scored).all():
            raise FloatingPointError("the model produced non-finite log-likelihoods (NaN/Inf logits)")
        total_nll += scored.double().sum().item()
        total_tokens += scored.numel()
    return PerplexityResult(math.exp(total_nll / total_tokens), total_nll, total_tokens, len(windows))
