import importlib.util
from pathlib import Path

from any4ao import Any4Tensor

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, TUTORIALS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quantize_and_generate_tutorial_runs_on_a_tiny_model():
    model = _load("quantize_and_generate").main(["--tiny"])
    assert isinstance(model.model.layers[1].self_attn.q_proj.weight, Any4Tensor)
    assert not isinstance(model.lm_head.weight, Any4Tensor)
