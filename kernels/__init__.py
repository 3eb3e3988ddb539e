"""Triton LUT kernels for Any4Tensor (installed as the subpackage `any4ao.kernels`)."""

if __name__ == "kernels":
    # This folder was imported as the top-level package `kernels`: the checkout's root is on sys.path
    # (`python -m ...` run from it). transformers imports the PyPI package of that name, so hand
    # the name over to it, wherever else on sys.path it is installed.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    )
    if _spec is None:
        raise ImportError(
            f"'kernels' resolved to any4ao's source folder {os.path.dirname(__file__)} (the checkout's root is on "
            "sys.path) and no other package of that name is installed"
        )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
