import io

import pytest
import torch
import torch.nn.functional as F
from helpers import reference_dequantize
from hypothesis import given
from hypothesis import strategies as st

from any4ao import Any4Tensor

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ULP = {torch.float32: 2**-23, torch.bfloat16: 2**-8, torch.float16: 2**-10}


def _tensor(n=24, k=200, group_size=32, nbits=4, dtype=torch.bfloat16, codebook="any", seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return w, Any4Tensor.from_hp(w, codebook=f"{codebook}{nbits}", group_size=group_size, kmeans_iterations=5)


@given(
    n=st.integers(1, 20),
    k=st.integers(16, 260),
    group_size=st.sampled_from([16, 32, 64, 128]),
    nbits=st.sampled_from([2, 3, 4]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_dequantize_matches_float64_formula(n, k, group_size, nbits, dtype, seed):
    _, t = _tensor(n, k, group_size, nbits, dtype, seed=seed)
    ref = reference_dequantize(t.codes(), t.lut, t.scale, t.zero_point, group_size)
    assert torch.equal(t.dequantize(torch.float64), ref)
    got = t.dequantize()
    assert got.dtype == dtype and got.shape == (n, k)
    # float32 arithmetic (error <= 2^-23 of the terms' magnitude) then one rounding to `dtype`
    terms = reference_dequantize(t.codes(), t.lut.abs(), t.scale.abs(), t.zero_point.abs(), group_size)
    bound = 2**-23 * terms + ULP[dtype] * ref.abs()
    assert torch.all((got.double() - ref).abs() <= bound)


@given(
    m=st.integers(1, 9),
    n=st.integers(1, 20),
    k=st.integers(16, 200),
    group_size=st.sampled_from([16, 32, 64]),
    dtype=st.sampled_from(DTYPES),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_matches_dense(m, n, k, group_size, dtype, bias, seed):
    _, t = _tensor(n, k, group_size, 4, dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    dense = t.dequantize()
    assert torch.equal(F.linear(x, t, b), F.linear(x, dense, b))


def test_matmul_forms():
    _, t = _tensor(dtype=torch.float32)
    dense = t.dequantize()
    x = torch.randn(5, 200)
    y = torch.randn(200, 3)
    b = torch.randn(24)
    torch.testing.assert_close(x @ t.t(), x @ dense.t())
    torch.testing.assert_close(torch.mm(x, t.t()), x @ dense.t())
    torch.testing.assert_close(t @ y, dense @ y)
    torch.testing.assert_close(torch.addmm(b, x, t.t()), torch.addmm(b, x, dense.t()))
    torch.testing.assert_close(
        torch.addmm(b, x, t.t(), beta=0.5, alpha=2.0), torch.addmm(b, x, dense.t(), beta=0.5, alpha=2.0)
    )
    torch.testing.assert_close(x @ t.transpose(0, 1), x @ dense.t())
    assert t.t().t().shape == t.shape and not t.t().t().transposed
    torch.testing.assert_close(t.t().dequantize(), dense.t())


def test_view_and_copy_ops():
    _, t = _tensor(n=24, k=200, group_size=32, dtype=torch.float32)
    dense = t.dequantize()
    assert torch.equal(t[3:11].dequantize(), dense[3:11])
    assert torch.equal(t.narrow(0, 5, 7).dequantize(), dense[5:12])
    assert torch.equal(t[:, 64:160].dequantize(), dense[:, 64:160])
    assert torch.equal(t[:, 192:].dequantize(), dense[:, 192:])  # ragged last group
    assert torch.equal(t.t()[:, 2:9].dequantize(), dense.t()[:, 2:9])
    with pytest.raises(ValueError, match="group boundaries"):
        t[:, 10:40]
    for op in (torch.Tensor.detach, torch.Tensor.clone):
        c = op(t)
        assert isinstance(c, Any4Tensor) and torch.equal(c.dequantize(), dense)
    other = _tensor(n=24, k=200, group_size=32, dtype=torch.float32, seed=9)[1]
    other.copy_(t)
    assert torch.equal(other.dequantize(), dense)


def test_to_dtype_and_device():
    _, t = _tensor(dtype=torch.float32)
    h = t.to(torch.float16)
    assert isinstance(h, Any4Tensor) and h.dtype == torch.float16 and h.lut.dtype == torch.float16
    assert h.qdata.dtype == torch.uint8
    assert torch.equal(h.qdata, t.qdata)
    for name in ("lut", "scale", "zero_point"):  # re-typing rounds each parameter once, nothing else
        assert torch.equal(getattr(h, name), getattr(t, name).half())
    assert t.to("cpu") is t or torch.equal(t.to("cpu").qdata, t.qdata)
    with pytest.raises(ValueError, match="cannot be converted to torch.int32"):
        t.to(torch.int32)


def test_unsupported_op_names_itself():
    _, t = _tensor()
    with pytest.raises(NotImplementedError, match="aten.add"):
        t + 1
    with pytest.raises(NotImplementedError, match="aten.mul"):
        t * 2


def test_linear_rejects_bad_inputs():
    _, t = _tensor(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="in_features=200"):
        F.linear(torch.randn(3, 100, dtype=torch.bfloat16), t)
    with pytest.raises(ValueError, match="dtype"):
        F.linear(torch.randn(3, 200), t)


def test_flatten_unflatten_and_pickle():
    _, t = _tensor()
    names, attrs = t.__tensor_flatten__()
    assert names == ["qdata", "lut", "scale", "zero_point"]
    rebuilt = Any4Tensor.__tensor_unflatten__({n: getattr(t, n) for n in names}, attrs, t.shape, t.stride())
    assert torch.equal(rebuilt.dequantize(), t.dequantize())
    buf = io.BytesIO()
    torch.save({"w": t}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["w"]
    assert isinstance(loaded, Any4Tensor) and torch.equal(loaded.dequantize(), t.dequantize())


def test_memory_of_4096_square_weight_at_group_128():
    w = torch.randn(4096, 4096, dtype=torch.bfloat16)
    t = Any4Tensor.from_hp(w, group_size=128, codebook="int4")
    inner = (t.qdata, t.lut, t.scale, t.zero_point)
    bits = 8 * sum(x.numel() * x.element_size() for x in inner) / w.numel()
    assert bits <= 4.32, bits
    assert bits == pytest.approx(t.bits_per_weight())


def test_value_checks_accept_everything_quantization_and_the_ops_produce():
    """validate_values (run by every load path) must not reject a legitimate tensor: constant
    groups (scale 0), 3-bit codes with an odd in_features (a padding nibble), fp16 weights at the
    dtype's edge, slices, transposes, dtype casts and FSDP's all-zero new_zeros."""
    constant = torch.tensor([0.5, -1.25, 0.0, 3.0])[:, None].expand(4, 96).contiguous()
    edge = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    edge = (edge / edge.abs().max() * 65504).half()
    tensors = [
        Any4Tensor.from_hp(constant, group_size=32),
        Any4Tensor.from_hp(constant, codebook="nf4", group_size=32),
        Any4Tensor.from_hp(torch.randn(6, 65), codebook="any3", group_size=16, kmeans_iterations=2),
        Any4Tensor.from_hp(torch.randn(6, 66), codebook="any2", group_size=16, kmeans_iterations=2),
        Any4Tensor.from_hp(edge, group_size=32, kmeans_iterations=3),
        Any4Tensor.from_hp(edge, codebook="fp4", group_size=32),
    ]
    t = _tensor(dtype=torch.float32)[1]
    tensors += [t[3:11], t[:, 64:], t.t(), t.to(torch.bfloat16), t.new_zeros(5, 200)]
    for x in tensors:
        assert x.validate_values() is x
        assert torch.isfinite(x.dequantize()).all()


def test_unpickling_recomputes_cached_attributes():
    """in_features is cached on the instance; a pickled (damaged or crafted) cache must not
    override the shape: torch.load recomputes it."""
    w = Any4Tensor.from_hp(torch.randn(40, 96, generator=torch.Generator().manual_seed(0)), group_size=32)
    assert w.in_features == 96
    w.__dict__["_in_features"] = 64
    buf = io.BytesIO()
    torch.save(w, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert loaded.in_features == 96 and tuple(loaded.dequantize().shape) == (40, 96)
