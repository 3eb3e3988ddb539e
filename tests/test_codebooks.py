import pytest
import torch
from helpers import reference_dequantize, weighted_error
from hypothesis import given
from hypothesis import strategies as st

from any4ao import Any4Tensor, Any4WeightOnlyConfig
from any4ao.codebooks.fixed import FP4_E2M1_VALUES, NF4_VALUES
from any4ao.codebooks.group_scaling import expand_groups, minmax_params, to_code_domain
from any4ao.codebooks.kmeans import lloyd_max
from any4ao.codebooks.quantize import quantize_weight

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _weight(n, k, seed, dtype=torch.float32, heavy_tail=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if heavy_tail:
        w = w * torch.rand(n, k, generator=g).pow(4) * 4
    return w.to(dtype)


def _quantize(w, nbits, group_size, kind, channel_weight=None, iterations=10, refine_rounds=2):
    codebook = kind if kind in ("nf4", "fp4") else f"{kind}{nbits}"
    config = Any4WeightOnlyConfig(
        codebook=codebook, group_size=group_size, kmeans_iterations=iterations, refine_rounds=refine_rounds
    )
    return quantize_weight(w, config, channel_weight)


def _dequant(q, group_size):
    return reference_dequantize(q.codes, q.lut, q.scale, q.zero_point, group_size)


@given(
    n=st.integers(1, 12),
    k=st.integers(16, 300),
    group_size=st.sampled_from([16, 32, 64, 128]),
    nbits=st.sampled_from([2, 3, 4]),
    dtype=st.sampled_from(DTYPES),
    calibrated=st.booleans(),
    seed=st.integers(0, 2**16),
    iterations=st.sampled_from([0, 10]),
)
def test_learned_codebook_never_loses_to_a_fixed_grid_on_any_row(
    n, k, group_size, nbits, dtype, calibrated, seed, iterations
):
    """Per row, under the objective any4 optimises (weighted by the calibration statistics when
    given): any4 <= int4, nf4 and fp4; any3 / any2 <= int3 / int2. By construction (k-means from
    each grid on its own scales, best start kept), not by luck, so it holds on every input."""
    w = _weight(n, k, seed, dtype, heavy_tail=seed % 2 == 0)
    if seed % 3 == 0:  # a few outlier input channels, as LLM weights have
        w[:, :: max(1, k // 5)] *= 20
    channel_weight = torch.rand(k, generator=torch.Generator().manual_seed(seed + 1)) if calibrated else None
    # iterations=0 with no refit: the grids themselves, rounded to the storage dtype as the fixed ones are
    learned = _quantize(w, nbits, group_size, "any", channel_weight, iterations, refine_rounds=2 if iterations else 0)
    e_any = weighted_error(w, _dequant(learned, group_size), channel_weight, per_row=True)
    grids = ["int", "nf4", "fp4"] if nbits == 4 else ["int"]
    for kind in grids:
        e_grid = weighted_error(w, _dequant(_quantize(w, nbits, group_size, kind), group_size), channel_weight, True)
        # Equal on degenerate inputs; the slack only absorbs float32 vs float64 summation order.
        worse = e_any > e_grid * (1 + 1e-5) + 1e-12
        assert not bool(worse.any()), f"rows {worse.nonzero().flatten().tolist()} worse than {kind}"
    assert int(learned.codes.max()) < 2**nbits and learned.codes.dtype == torch.uint8


def test_learned_codebook_without_iterations_is_the_best_rounded_grid_per_row():
    """kmeans_iterations=0, refine_rounds=0 in bf16: the start choice used to compare the grids
    unrounded, while they are stored rounded, so 7 of 1280 rows ended above the best fixed grid."""
    torch.manual_seed(0)
    for _ in range(20):
        w = torch.randn(64, 256).bfloat16()
        err = {
            c: (Any4Tensor.from_hp(w, codebook=c, group_size=64, **kw).dequantize(torch.float64) - w.double())
            .square()
            .sum(1)
            for c, kw in [("any4", dict(kmeans_iterations=0, refine_rounds=0)), ("int4", {}), ("nf4", {}), ("fp4", {})]
        }
        best = torch.stack([err["int4"], err["nf4"], err["fp4"]]).min(0).values
        assert not bool((err["any4"] > best * (1 + 1e-9)).any())


@given(
    n=st.integers(1, 8),
    p=st.integers(2, 200),
    seed=st.integers(0, 2**16),
)
def test_kmeans_error_is_non_increasing(n, p, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g) * 4 + 7
    weight = torch.rand(n, p, generator=g)
    init = torch.arange(16.0)
    result = lloyd_max(x, weight, init, iterations=25, track_error=True)
    history = torch.stack(result.error_history)  # (iterations + 1, n)
    assert torch.all(history[1:] <= history[:-1] * (1 + 1e-6) + 1e-9)
    assert torch.all(result.centroids[:, 1:] >= result.centroids[:, :-1])  # sorted LUT


@pytest.mark.parametrize("codebook", ["any", "int", "nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_rows_are_exact(codebook, dtype):
    values = torch.tensor([0.5, -1.25, 0.0, 3.0]).to(dtype)
    w = values[:, None].expand(4, 96).contiguous()
    q = _quantize(w, 4, 32, codebook)
    assert torch.equal(_dequant(q, 32).to(dtype), w)


@given(
    n=st.integers(1, 6),
    distinct=st.integers(1, 16),
    groups=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_rows_with_at_most_16_distinct_values_are_exact(n, distinct, groups, seed):
    """Every group holds the row's min and max, so all groups share scale and zero and a row has
    <= 16 distinct code-domain values: k-means must represent them all exactly."""
    g = torch.Generator().manual_seed(seed)
    group_size = 32
    rows = []
    for _ in range(n):
        vals = torch.randn(distinct, generator=g)
        idx = torch.randint(0, distinct, (groups, group_size), generator=g)
        idx[:, 0], idx[:, 1] = vals.argmin(), vals.argmax()
        rows.append(vals[idx].reshape(-1))
    w = torch.stack(rows)
    q = _quantize(w, 4, group_size, "any", iterations=100)
    torch.testing.assert_close(_dequant(q, group_size).float(), w, rtol=1e-5, atol=1e-6)


def test_more_bits_lower_error():
    w = _weight(64, 512, seed=3)
    errors = [weighted_error(w, _dequant(_quantize(w, b, 64, "any"), 64)) for b in (2, 3, 4)]
    assert errors[0] > errors[1] > errors[2]


def test_quantization_is_deterministic():
    w = _weight(32, 256, seed=4)
    a = _quantize(w, 4, 64, "any")
    b = _quantize(w, 4, 64, "any")
    for name in ("codes", "lut", "scale", "zero_point"):
        assert torch.equal(getattr(a, name), getattr(b, name))


def test_fixed_codebooks_use_their_published_values():
    w = _weight(8, 128, seed=5)
    assert torch.equal(_quantize(w, 4, 64, "nf4").lut[0], torch.tensor(NF4_VALUES))
    assert torch.equal(_quantize(w, 4, 64, "fp4").lut[0], torch.tensor(FP4_E2M1_VALUES))
    assert torch.equal(_quantize(w, 4, 64, "int").lut[0], torch.arange(16.0))
    # absmax scaling: the largest magnitude of each group is represented exactly (up to rounding)
    q = _quantize(w, 4, 64, "nf4")
    deq = _dequant(q, 64).float()
    gmax = w.reshape(8, 2, 64).abs().amax(-1)
    torch.testing.assert_close(deq.reshape(8, 2, 64).abs().amax(-1), gmax)


@pytest.mark.parametrize("codebook", ["int4", "int3", "nf4", "fp4", "any4"])
def test_a_fixed_grid_is_recognised_from_its_lut_after_a_dtype_cast(codebook):
    """What save_pretrained records for a copied model (CONFIG_OF knows only the original) and what
    save_quantized checks a fixed-grid config against."""
    from any4ao.codebooks.fixed import fixed_codebook_of

    t = Any4Tensor.from_hp(_weight(8, 64, seed=1).bfloat16(), codebook=codebook, group_size=32)
    expected = None if codebook == "any4" else codebook
    assert fixed_codebook_of(t.lut, t.nbits) == expected
    assert fixed_codebook_of(t.lut.half(), t.nbits) == expected  # bf16 values, not fp16's rounding of nf4


def test_ragged_last_group_uses_only_its_own_values():
    """K=80 with G=32: the last group has 16 real columns; its scale comes from those alone."""
    w = _weight(4, 80, seed=6)
    scales, zeros = minmax_params(w, 32, 0.0, 15.0, torch.float32)
    assert scales.shape == (4, 3)
    last = w[:, 64:]
    torch.testing.assert_close(zeros[:, 2], last.amin(1))
    torch.testing.assert_close(scales[:, 2], (last.amax(1) - last.amin(1)) / 15)
    x = to_code_domain(w, scales, zeros, 32)
    assert x.min() >= -1e-5 and x.max() <= 15 + 1e-4
    assert expand_groups(scales, 80, 32).shape == (4, 80)


def test_calibration_weights_steer_the_error():
    """Weighting channels shifts error away from them: weighted error drops versus unweighted k-means."""
    w = _weight(64, 256, seed=7)
    cw = torch.ones(256)
    cw[:32] = 100.0
    plain = _quantize(w, 4, 128, "any")
    steered = _quantize(w, 4, 128, "any", channel_weight=cw)
    assert weighted_error(w, _dequant(steered, 128), cw) < weighted_error(w, _dequant(plain, 128), cw)


def test_any4_tensor_from_hp_matches_quantize_weight():
    w = _weight(16, 96, seed=8, dtype=torch.bfloat16)
    t = Any4Tensor.from_hp(w, group_size=32)
    q = _quantize(w, 4, 32, "any")
    assert torch.equal(t.codes(), q.codes) and torch.equal(t.lut, q.lut)
