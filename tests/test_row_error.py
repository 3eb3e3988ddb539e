"""The quantizer's fused per-row kernels under TRITON_INTERPRET=1, with NaN-poisoned outputs: the
per-row error (any4ao.kernels.row_error) against the torch versions the CPU runs
(kmeans.weighted_sse, refine.real_domain_error: float64 sums) and a float64 reference written out
here; the k-means sample weights (any4ao.kernels.sample_weight) against quantize._sample_weight."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from any4ao.codebooks.kmeans import weighted_sse
from any4ao.codebooks.quantize import MIN_SAMPLE_WEIGHT, _sample_weight
from any4ao.codebooks.refine import real_domain_error
from any4ao.kernels.row_error import row_error
from any4ao.kernels.sample_weight import sample_weight


def _case(rows, k, c, group, shared_weight, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g) * 3
    lut = torch.randn(rows, c, generator=g).sort(1).values
    codes = torch.randint(0, c, (rows, k), generator=g)
    groups = -(-k // group)
    scales = torch.rand(rows, groups, generator=g) + 0.1
    zeros = torch.randn(rows, groups, generator=g)
    weight = torch.rand(1 if shared_weight else rows, k, generator=g, dtype=torch.float64)
    return w, lut, codes, scales, zeros, weight


@settings(max_examples=12, deadline=None)
@given(
    rows=st.integers(1, 9),
    k=st.integers(1, 700),  # ragged last block, K below and above one block
    c=st.sampled_from([4, 8, 16]),
    group=st.sampled_from([16, 32, 128]),
    shared_weight=st.booleans(),
    expanded=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_row_error_matches_float64(rows, k, c, group, shared_weight, expanded, seed):
    w, lut, codes, scales, zeros, weight = _case(rows, k, c, group, shared_weight, seed)
    if shared_weight and expanded:  # an expanded (R, K) view of one row, as lloyd_max passes it
        weight = weight.expand(rows, -1)
    out = torch.full((rows,), float("nan"), dtype=torch.float64)
    got = row_error(w, weight, lut, codes, scales, zeros, group, out=out)
    w_hat = torch.gather(lut.double(), 1, codes) * scales.double().repeat_interleave(group, 1)[:, :k]
    w_hat = w_hat + zeros.double().repeat_interleave(group, 1)[:, :k]
    ref = (weight * (w.double() - w_hat).square()).sum(1)
    assert got is out and torch.allclose(got, ref, rtol=1e-12, atol=0)
    assert torch.allclose(got, real_domain_error(w, weight, scales, zeros, lut, codes, group), rtol=1e-12, atol=0)
    plain = row_error(w, weight.float(), lut, codes.to(torch.uint8))
    assert torch.allclose(plain, weighted_sse(w, weight.float(), lut, codes), rtol=1e-12, atol=0)


def test_row_error_rejects_what_it_cannot_read():
    w, lut, codes, scales, zeros, weight = _case(3, 64, 16, 32, False, 0)
    with pytest.raises(ValueError, match="float32"):
        row_error(w.double(), weight, lut, codes)
    with pytest.raises(ValueError, match="codes"):
        row_error(w, weight, lut, codes[:, :32])
    with pytest.raises(ValueError, match="do not fit"):
        row_error(w, weight, lut, codes, scales[:, :1], zeros[:, :1], 32)
    with pytest.raises(ValueError, match="sample_weight"):  # scales for group 32, asked for group 16
        sample_weight(scales, weight, 64, 16, MIN_SAMPLE_WEIGHT)


@settings(max_examples=12, deadline=None)
@given(
    rows=st.integers(1, 6),
    k=st.integers(1, 700),
    group=st.sampled_from([16, 32, 128]),
    shared=st.booleans(),
    exponent=st.sampled_from([0, 30, -30]),  # scales near 1e30 / 1e-30: the float64 normalisation matters
    zero_scale_row=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sample_weight_kernel_equals_the_torch_version_bit_for_bit(
    rows, k, group, shared, exponent, zero_scale_row, seed
):
    g = torch.Generator().manual_seed(seed)
    scales = (torch.rand(rows, -(-k // group), generator=g) * 10.0**exponent).float()
    if zero_scale_row:
        scales[0] = 0
    h = torch.rand(1 if shared else rows, k, generator=g, dtype=torch.float64)
    h[h < 0.1] = 0  # channels without weight
    h[h > 0.95] = 1e-30  # below the floor once normalised
    out = torch.full((rows, k), float("nan"))
    got = sample_weight(scales, h, k, group, MIN_SAMPLE_WEIGHT, out=out)
    assert got is out and torch.equal(got, _sample_weight(scales, h, k, group))
