"""The Triton kernels live in the repository's top-level `kernels/` folder and install as the
subpackage `any4ao.kernels` (see [tool.setuptools.package-dir] in pyproject.toml). When any4ao is
imported straight from a source checkout that was not installed (e.g. PYTHONPATH=. on a GPU box),
this maps `any4ao.kernels` onto that folder so both layouts behave the same."""

import importlib.util
import sys
from pathlib import Path


def ensure_kernels_importable() -> None:
    if "any4ao.kernels" in sys.modules:
        return
    package_dir = Path(__file__).resolve().parent
    if (package_dir / "kernels").is_dir():  # installed layout
        return
    source_dir = package_dir.parent / "kernels"
    if not (source_dir / "__init__.py").is_file():
        return  # an editable install's finder (or nothing) provides it
    try:
        if importlib.util.find_spec("any4ao.kernels") is not None:
            return
    except ModuleNotFoundError:
        pass
    spec = importlib.util.spec_from_file_location(
        "any4ao.kernels", source_dir / "__init__.py", submodule_search_locations=[str(source_dir)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["any4ao.kernels"] = module
    spec.loader.exec_module(module)
