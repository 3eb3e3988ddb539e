"""Paired bootstrap over evaluation windows: how sure is an ordering of two methods?

All methods are scored on the same windows, so window w gives every method a summed NLL s[m, w]
over the same n[w] tokens. A resample draws W windows with replacement (the same draw for every
method) and recomputes each statistic from the drawn windows' token-weighted mean NLL
    nll[m] = sum_w s[m, w] / sum_w n[w]
(equal to the mean of per-window mean NLLs when every window scores the same number of tokens),
so the point estimates are exactly the reported perplexities: PPL = exp(nll). Intervals are
percentile intervals (2.5 %, 97.5 %) of `resamples` draws from a generator seeded with `seed`.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch


@dataclass
class Interval:
    estimate: float
    low: float
    high: float

    def excludes(self, value: float) -> bool:
        return not self.low <= value <= self.high

    def fmt(self, digits: int = 3) -> str:
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def _draws(windows: int, resamples: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, windows, (resamples, windows), generator=g)


def _interval(estimate: float, samples: torch.Tensor, level: float = 0.95) -> Interval:
    samples = samples[torch.isfinite(samples)]
    if samples.numel() == 0:
        return Interval(estimate, math.nan, math.nan)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=samples.dtype)
    low, high = torch.quantile(samples, q).tolist()
    return Interval(estimate, low, high)


MIN_WINDOWS_TO_RESOLVE = 6


@dataclass
class Comparison:
    """Method `method` against `reference`: the mean-NLL difference (nats/token, > 0: `method` is
    worse) and the perplexity ratio exp(difference), with 95 % intervals; resolved when the
    interval of the difference excludes 0, over at least MIN_WINDOWS_TO_RESOLVE windows."""

    method: str
    reference: str
    nll_difference: Interval
    ppl_ratio: Interval
    resolved: bool


class PairedBootstrap:
    """Per-window summed NLLs of several methods on the same windows (`window_nll[method]`, one
    float per window) and the scored tokens per window (`window_tokens`)."""

    def __init__(
        self,
        window_nll: Dict[str, Sequence[float]],
        window_tokens: Sequence[int],
        resamples: int = 1000,
        seed: int = 0,
    ):
        self.methods = list(window_nll)
        self.nll = torch.tensor([list(window_nll[m]) for m in self.methods], dtype=torch.float64)  # (M, W)
        self.tokens = torch.tensor(list(window_tokens), dtype=torch.float64)
        if self.nll.shape[1] != self.tokens.numel():
            raise ValueError(f"{self.nll.shape[1]} windows of NLL but {self.tokens.numel()} token counts")
        if resamples < 1:
            raise ValueError(f"resamples must be >= 1, got {resamples}")
        self.resamples, self.seed = resamples, seed
        idx = _draws(self.tokens.numel(), resamples, seed)  # (B, W)
        # (M, B): each method's token-weighted mean NLL on every resample
        self.samples = self.nll[:, idx].sum(-1) / self.tokens[idx].sum(-1)
        self.point = self.nll.sum(-1) / self.tokens.sum()

    def _row(self, method: str) -> int:
        return self.methods.index(method)

    def perplexity(self, method: str) -> float:
        return math.exp(self.point[self._row(method)].item())

    def compare(self, method: str, reference: str) -> Comparison:
        a, b = self._row(method), self._row(reference)
        diff = _interval((self.point[a] - self.point[b]).item(), self.samples[a] - self.samples[b])
        ratio = Interval(math.exp(diff.estimate), math.exp(diff.low), math.exp(diff.high))
        # and enough windows: with fewer than 6 every resample of windows that all lean one way leans
        # that way too, whatever the chance of it (a sign test of 5 agreeing windows: p = 0.0625)
        resolved = method != reference and diff.excludes(0.0) and self.tokens.numel() >= MIN_WINDOWS_TO_RESOLVE
        return Comparison(method, reference, diff, ratio, resolved)

    def increase_ratio(self, method: str, reference: str, baseline: str) -> Interval:
        """(PPL[method] - PPL[baseline]) / (PPL[reference] - PPL[baseline]): the method's perplexity
        increase as a fraction of the reference's (e.g. of nf4's), with its interval."""
        m, r, b = (self._row(x) for x in (method, reference, baseline))
        p = self.point.exp()
        s = self.samples.exp()
        estimate = ((p[m] - p[b]) / (p[r] - p[b])).item() if p[r] != p[b] else math.nan
        return _interval(estimate, (s[m] - s[b]) / (s[r] - s[b]))

    def ordering(self) -> List[Comparison]:
        """Methods sorted by perplexity, best first, each compared with the next one."""
        order = sorted(self.methods, key=lambda m: self.point[self._row(m)].item())
        return [self.compare(worse, better) for better, worse in zip(order, order[1:])]


def bootstrap_or_none(
    window_nll: Dict[str, Sequence[float]], window_tokens: Sequence[int], resamples: int, seed: int
) -> Optional[PairedBootstrap]:
    """A PairedBootstrap, or None when it cannot say anything (under 2 windows or resamples == 0)."""
    if resamples <= 0 or len(window_tokens) < 2 or not window_nll:
        return None
    return PairedBootstrap(window_nll, window_tokens, resamples, seed)
