import os

# Kernel tests run the Triton kernels on CPU tensors through the interpreter; the variable must
# be set before triton is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    """Slow tests are skipped unless asked for: by --run-slow, or by a -m expression that names
    `slow` (make test-slow). Any other -m (e.g. -m 'not distributed') leaves them skipped, rather
    than replacing an addopts filter and silently running them."""
    if config.getoption("--run-slow") or "slow" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow (make test-slow) or --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
