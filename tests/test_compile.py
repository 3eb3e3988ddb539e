"""torch.compile on a quantized model: one graph, no breaks, same numbers as eager (CPU inductor;
the Triton-kernel path is checked on the GPU by benchmarks/check_gpu.py)."""

import pytest
import torch

from any4ao import Any4WeightOnlyConfig, quantize_model
from tiny_models import tiny_llama


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
    a = Any4Tensor.from_hp(torch.randn(16, 64, generator=g), group_size=32, iterations=2)
    b = Any4Tensor.from_hp(torch.randn(16, 64, generator=g), group_size=32, iterations=2)
    assert a._stable_hash_for_caching() == b._stable_hash_for_caching()
    others = [
        Any4Tensor.from_hp(torch.randn(16, 128, generator=g), group_size=32, iterations=2),
        Any4Tensor.from_hp(torch.randn(16, 64, generator=g), group_size=64, iterations=2),
        Any4Tensor.from_hp(torch.randn(16, 64, generator=g), nbits=3, group_size=32, iterations=2),
        Any4Tensor.from_hp(torch.randn(16, 64, generator=g).bfloat16(), group_size=32, iterations=2),
        a.t(),
    ]
    keys = {t._stable_hash_for_caching() for t in others} | {a._stable_hash_for_caching()}
    assert len(keys) == len(others) + 1
