import importlib.util
from pathlib import Path

import pytest
import torch

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


def test_compare_codebooks_tutorial_writes_the_plot_and_any4_has_the_lowest_error(tmp_path):
    out = tmp_path / "codebooks.png"
    formats = _load("compare_codebooks").main(["--tiny", "--out", str(out)])
    assert out.stat().st_size > 10_000
    assert set(formats) == {"int4", "nf4", "fp4", "any4"}
    # the learned LUT is the point of the plot: on the same weights it must beat every fixed grid
    module = _load("compare_codebooks")
    model, _ = module.load(True)
    weight = model.model.layers[0].mlp.down_proj.weight.detach()
    rel = {n: ((q.dequantize() - weight).norm() / weight.norm()).item() for n, q in formats.items()}
    assert rel["any4"] < min(rel["int4"], rel["nf4"], rel["fp4"]), rel


def test_save_and_load_tutorial_reloads_identical_models_three_ways(tmp_path):
    results = _load("save_and_load").main(["--tiny", "--dir", str(tmp_path)])
    assert len(results) == 3


@pytest.mark.skipif(not torch._inductor.cpp_builder.get_cpp_compiler(), reason="inductor needs a C++ compiler")
def test_compile_and_benchmark_tutorial_compiles_fullgraph_and_matches_eager():
    rel, rows = _load("compile_and_benchmark").main(["--tiny", "--reps", "2", "--prompt", "16"])
    assert rel < 1e-4 and len(rows) == 6


@pytest.mark.distributed
def test_qlora_fsdp_tutorial_lowers_the_loss_on_two_cpu_ranks():
    pytest.importorskip("peft")
    import sys

    sys.path.insert(0, str(TUTORIALS))  # spawned ranks import the tutorial module by name
    try:
        losses = importlib.import_module("qlora_fsdp").main(["--tiny", "--steps", "20"])
    finally:
        sys.path.remove(str(TUTORIALS))
    assert losses[-1] < 0.9 * losses[0], losses
