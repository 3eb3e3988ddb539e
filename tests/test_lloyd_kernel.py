"""The fused Lloyd step (any4ao.kernels.lloyd) under TRITON_INTERPRET=1, against float64 torch.

Outputs are passed in NaN-filled, so an element the kernel does not write fails the comparison."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from any4ao.codebooks.kmeans import lloyd_max, nearest_code
from any4ao.kernels.lloyd import lloyd_step


def _reference(x, w, centroids):
    codes = nearest_code(x, centroids)
    c = centroids.shape[1]
    x64, w64 = x.double(), w.double()
    sums = torch.zeros(x.shape[0], c, dtype=torch.float64).scatter_add_(1, codes, w64 * x64)
    weights = torch.zeros(x.shape[0], c, dtype=torch.float64).scatter_add_(1, codes, w64)
    err = (w64 * (x64 - torch.gather(centroids.double(), 1, codes)).square()).sum(1)
    return sums, weights, err


def _problem(rows, k, c, seed, ties):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * 4
    if ties:  # elements exactly on decision boundaries and repeated values
        x = x.round()
    w = torch.rand(rows, k, generator=g)
    w[:, ::7] = 0.0  # zero-weight elements belong to a cluster but add nothing
    centroids = torch.randn(rows, c, generator=g).mul(3).round().sort(1).values  # duplicates happen
    return x, w, centroids


@settings(max_examples=15)
@given(
    rows=st.integers(1, 5),
    k=st.integers(1, 2100),
    c=st.sampled_from([2, 3, 4, 8, 16]),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_lloyd_step_matches_float64(rows, k, c, seed, ties):
    x, w, centroids = _problem(rows, k, c, seed, ties)
    out = tuple(torch.full(shape, float("nan")) for shape in ((rows, c), (rows, c), (rows,)))
    sums, weights, err = lloyd_step(x, w, centroids, out=out)
    ref_sums, ref_weights, ref_err = _reference(x, w, centroids)
    scale = (w.double() * x.double().abs()).sum(1, keepdim=True) + 1e-30
    assert not any(bool(t.isnan().any()) for t in (sums, weights, err)), "unwritten output"
    assert torch.allclose(weights.double(), ref_weights, rtol=1e-5, atol=1e-4)
    assert ((sums.double() - ref_sums).abs() / scale).max() < 1e-5
    assert torch.allclose(err.double(), ref_err, rtol=1e-4, atol=1e-4)


def test_lloyd_step_rejects_bad_input():
    x, w, c = _problem(2, 64, 16, 0, False)
    with pytest.raises(ValueError, match="float32"):
        lloyd_step(x.double(), w, c)
    with pytest.raises(ValueError, match="centroids"):
        lloyd_step(x, w, torch.zeros(2, 17))
    with pytest.raises(ValueError, match="contiguous"):
        lloyd_step(x.t().contiguous().t(), w, c)


@settings(max_examples=6)
@given(seed=st.integers(0, 2**16), k=st.integers(16, 700))
def test_fused_lloyd_max_follows_the_torch_loop(seed, k):
    """Same start, same updates: the fused loop ends where the torch loop ends (fp32 sums differ
    only in order), including rows that need empty clusters refilled (duplicate start centroids)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, k, generator=g)
    x[0, :] = torch.arange(k).remainder(3).float()  # 3 distinct values for 16 centroids
    w = torch.rand(6, k, generator=g) + 0.1
    init = torch.linspace(-2, 2, 16).repeat(6, 1)
    init[:, 7] = init[:, 8]  # a duplicate: one empty cluster from the first step
    init = init.sort(1).values
    fused = lloyd_max(x, w, init, 8, fused=True)
    plain = lloyd_max(x, w, init, 8, fused=False)
    err_fused = (w.double() * (x - torch.gather(fused.centroids, 1, fused.codes)).double().square()).sum(1)
    err_plain = (w.double() * (x - torch.gather(plain.centroids, 1, plain.codes)).double().square()).sum(1)
    assert torch.allclose(err_fused, err_plain, rtol=1e-4, atol=1e-7)
    assert torch.allclose(fused.centroids, plain.centroids, rtol=1e-4, atol=1e-5)
