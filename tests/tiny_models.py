"""The tests import tiny models by this short name; they live in any4ao.testing (benchmarks use them too)."""

from any4ao.testing.tiny_models import tiny_llama, tiny_tokenizer  # noqa: F401
