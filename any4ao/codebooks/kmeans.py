"""Weighted 1-D k-means (Lloyd-Max) for many rows at once.

Each row of `x` is an independent problem with its own centroids; all rows advance together in
tensor ops (no per-row Python loop), on whatever device `x` lives on.
"""

import functools
import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch

# On the CPU, up to this many centroids, counting the boundaries below each element (one broadcast
# compare per boundary) beats torch.searchsorted 2.3x for 16 centroids (the k-means hot spot). On
# CUDA it is the other way round: 15 small kernels took 7.8 s per 1.07e9 weights on an H100 against
# 3.8 s with searchsorted (benchmarks/check_gpu.py), so CUDA keeps searchsorted.
_COUNTING_MAX_CENTROIDS = 16


def nearest_code(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the nearest centroid for each element. `centroids` (R, C) must be sorted per
    row; the decision boundaries are the midpoints, and the code is the number of boundaries strictly
    below the element (ties go to the lower code, as searchsorted's left side does)."""
    boundaries = (centroids[:, 1:] + centroids[:, :-1]) * 0.5
    if x.is_cuda or centroids.shape[1] > _COUNTING_MAX_CENTROIDS:
        return torch.searchsorted(boundaries.contiguous(), x.contiguous())
    codes = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for j in range(boundaries.shape[1]):
        codes += x > boundaries[:, j : j + 1]
    return codes.long()


def weighted_sse(x, weight, centroids, codes) -> torch.Tensor:
    """Per-row sum of weight * (x - centroid[code])^2, accumulated in float64 (on CUDA one fused
    kernel, any4ao.kernels.row_error)."""
    if cuda_kernels_serve(x, centroids):
        from any4ao.kernels.row_error import row_error

        return row_error(x, weight, centroids, codes)
    err = x - torch.gather(centroids, 1, codes)
    return (weight.double() * err.double().square()).sum(1)


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # (R, C), sorted per row
    codes: torch.Tensor  # (R, P) int64
    iterations: int
    error_history: List[torch.Tensor] = field(default_factory=list)  # per-row SSE after each assignment


def _fill_empty_clusters(x, weight, centroids, codes, cluster_weight):
    """Move centroids that own no weight onto the worst-served points of their row.

    Such a centroid changes no error where it is; on a badly served point the next assignment can
    only lower the error. This is what makes rows with <= C distinct values converge to exact."""
    empty = cluster_weight <= 0
    if not bool(empty.any()):
        return centroids
    num_clusters = centroids.shape[1]
    err = weight * (x - torch.gather(centroids, 1, codes)).square()
    worst = err.topk(min(num_clusters, x.shape[1]), dim=1).indices  # (R, C') worst first
    rank = (empty.cumsum(1) - 1).clamp(min=0, max=worst.shape[1] - 1)  # j-th empty -> j-th worst
    candidates = torch.gather(x, 1, torch.gather(worst, 1, rank))
    return torch.where(empty, candidates, centroids)


@functools.lru_cache(maxsize=1)
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401  (a Linux-only dependency)
    except ImportError:
        return False
    return True


def cuda_kernels_serve(*tensors: torch.Tensor) -> bool:
    """The quantizer's one-pass Triton kernels (row error, sample weights) serve these tensors: all
    on CUDA and float32, and triton imports; elsewhere the torch versions run."""
    return all(t.is_cuda and t.dtype == torch.float32 for t in tensors) and _triton_imports()


def _fused_steps_available(x: torch.Tensor, num_centroids: int) -> bool:
    if num_centroids > 16 or not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    try:
        import any4ao.kernels.lloyd  # noqa: F401  (triton is a Linux-only dependency)
    except ImportError:
        return False
    return True


def _lloyd_fused(x, weight, centroids, iterations) -> KMeansResult:
    """The Lloyd loop with each step one fused kernel (any4ao.kernels.lloyd). Same updates as the
    loop below; it stops once an update leaves every centroid where it was (then no code changes)."""
    from any4ao.kernels.lloyd import lloyd_step

    x, weight = x.contiguous(), weight.contiguous()
    done = 0
    for done in range(1, iterations + 1):
        cluster_sum, cluster_weight, _ = lloyd_step(x, weight, centroids, with_error=False)
        safe = torch.where(cluster_weight > 0, cluster_weight, torch.ones_like(cluster_weight))
        new = torch.where(cluster_weight > 0, cluster_sum / safe, centroids)
        empty = cluster_weight <= 0
        refill = bool(empty.any())  # (the one host sync of a step without empty clusters)
        if refill:
            new = _fill_empty_clusters(x, weight, new, nearest_code(x, centroids), cluster_weight)
        new = new.sort(dim=1).values
        # converged when no centroid moved; checked every 4th step only, each check is a sync
        if not refill and done % 4 == 0 and torch.equal(new, centroids):
            break
        centroids = new
    return KMeansResult(centroids=centroids, codes=nearest_code(x, centroids), iterations=done)


def lloyd_max(
    x: torch.Tensor,
    weight: torch.Tensor,
    init: torch.Tensor,
    iterations: int,
    track_error: bool = False,
    fused: Optional[bool] = None,
) -> KMeansResult:
    """Minimise sum_p weight[r, p] * (x[r, p] - c[r, code[r, p]])^2 for every row r.

    Starts from `init` (R, C), sorted; the first assignment is the nearest-init-centroid solution,
    and every Lloyd step (assign, then weighted mean) can only lower each row's error, so the result
    is never worse than `init` itself. Stops early once no code changes.
    fused: run each step as one Triton kernel (default: on CUDA tensors, when not tracking errors)."""
    x = x.float()
    weight = weight.float().expand_as(x)
    centroids = init.float().expand(x.shape[0], -1).contiguous()
    if fused is None:
        fused = x.is_cuda and not track_error and _fused_steps_available(x, centroids.shape[1])
    if fused:
        if track_error or not _fused_steps_available(x, centroids.shape[1]):
            raise ValueError("the fused Lloyd steps need CUDA tensors (or TRITON_INTERPRET=1), <= 16 centroids")
        return _lloyd_fused(x, weight, centroids, iterations)
    weighted_x = weight * x
    codes = nearest_code(x, centroids)
    history = [weighted_sse(x, weight, centroids, codes)] if track_error else []
    done = 0
    for done in range(1, iterations + 1):
        cluster_weight = torch.zeros_like(centroids).scatter_add_(1, codes, weight)
        cluster_sum = torch.zeros_like(centroids).scatter_add_(1, codes, weighted_x)
        safe = torch.where(cluster_weight > 0, cluster_weight, torch.ones_like(cluster_weight))
        centroids = torch.where(cluster_weight > 0, cluster_sum / safe, centroids)
        centroids = _fill_empty_clusters(x, weight, centroids, codes, cluster_weight)
        centroids = centroids.sort(dim=1).values
        new_codes = nearest_code(x, centroids)
        if track_error:
            history.append(weighted_sse(x, weight, centroids, new_codes))
        changed = not torch.equal(new_codes, codes)
        codes = new_codes
        if not changed:
            break
    return KMeansResult(centroids=centroids, codes=codes, iterations=done, error_history=history)
