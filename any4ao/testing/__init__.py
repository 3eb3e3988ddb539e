"""Helpers for tests and benchmarks: tiny models built from configs and the distributed checks
(shared by tests/test_distributed.py and benchmarks/check_distributed.py). They need transformers."""
