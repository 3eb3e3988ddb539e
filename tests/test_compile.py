"""torch.compile on a quantized model: one graph, no breaks, same numbers as eager (CPU inductor;
the Triton-kernel path is checked on the GPU by benchmarks/check_gpu.py)."""

import pytest
import torch
from tiny_models import tiny_llama

from any4ao import Any4WeightOnlyConfig, quantize_model


@pytest.mark.skipif(not torch._inductor.cpp_builder.get_cpp_compiler(), reason="inductor needs a C++ compiler")
def test_fullgraph_compile_matches_eager_without_recompiling_per_length():
    model = tiny_llama()
    quantize_model(model, Any4WeightOnlyConfig(group_size=32, kmeans_iterations=3), progress=False)
    torch.compiler.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)  # fullgraph: any graph break raises
    with torch.no_grad():
        for length in (8, 13, 21):
            ids = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(length))
            eager = model(ids, use_cache=False).logits
            torch.testing.assert_close(compiled(ids, use_cache=False).logits, eager, rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph serves every length


def test_compile_cache_key_is_metadata_only():
    """Any4Tensor._stable_hash_for_caching (AOT autograd's cache key for subclasses): equal for
    weights that differ only in values, different when shape, bits, group or orientation differ."""
    from any4ao import Any4Tensor

    g = torch.Generator().manual_seed(0)
    a = Any4Tensor.from_hp(torch.randn(16, 64, generator=g), group_size=32, kmeans_iterations=2)
    b = Any4Tensor.from_hp(torch.randn(16, 64, generator=g), group_size=32, kmeans_iterations=2)
    assert a._stable_hash_for_caching() == b._stable_hash_for_caching()
    others = [
        Any4Tensor.from_hp(torch.randn(16, 128, generator=g), group_size=32, kmeans_iterations=2),
        Any4Tensor.from_hp(torch.randn(16, 64, generator=g), group_size=64, kmeans_iterations=2),
        Any4Tensor.from_hp(torch.randn(16, 64, generator=g), codebook="any3", group_size=32, kmeans_iterations=2),
        Any4Tensor.from_hp(torch.randn(16, 64, generator=g).bfloat16(), group_size=32, kmeans_iterations=2),
        a.t(),
    ]
    keys = {t._stable_hash_for_caching() for t in others} | {a._stable_hash_for_caching()}
    assert len(keys) == len(others) + 1


def test_fast_tensor_flatten_matches_torchao_generic():
    """Any4Tensor.__tensor_flatten__ (a fast path: compiled models call it per weight per call)
    returns what torchao's generic version derives from tensor_data_names / attribute names, and
    __tensor_unflatten__ rebuilds an equal tensor from it."""
    from torchao.utils import TorchAOBaseTensor

    from any4ao import Any4Tensor

    w = Any4Tensor.from_hp(
        torch.randn(16, 64, generator=torch.Generator().manual_seed(1)), group_size=32, kmeans_iterations=2
    )
    for t in (w, w.t()):
        names, meta = t.__tensor_flatten__()
        assert (names, meta) == TorchAOBaseTensor.__tensor_flatten__(t)
        rebuilt = Any4Tensor.__tensor_unflatten__({n: getattr(t, n) for n in names}, meta, t.shape, t.stride())
        assert rebuilt.shape == t.shape and rebuilt.transposed == t.transposed
        torch.testing.assert_close(rebuilt.dequantize(), t.dequantize(), rtol=0, atol=0)
