"""Adversarial inputs at every public entry point: each must raise the exact error type, name the
layer / tensor / file, and leave the model and the files as they were. Nothing may load or run as a
silently wrong model.

Entry points: quantize_model, quantize_ (torchao), Any4Tensor(...), from_codes, from_hp,
save_quantized, load_quantized, torch.save + torch.load(weights_only=True), save_pretrained +
from_pretrained, torch.ops.any4ao.lut_linear / dequantize, F.linear, .to(dtype).
"""

import dataclasses
import io
import json
import re
import shutil
import struct
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from tiny_models import tiny_llama
from torch import nn
from torchao.quantization import quantize_

import any4ao
from any4ao import Any4Tensor, Any4WeightOnlyConfig, LayerError, load_quantized, quantize_model, save_quantized
from any4ao.validation import (
    CHECKSUM_ALGORITHM,
    CHECKSUM_KEY,
    CheckpointError,
    ChecksumError,
    InvalidAny4TensorError,
    checksums,
)

CONFIG = Any4WeightOnlyConfig(group_size=32, kmeans_iterations=2, refine_rounds=1)
IDS = torch.arange(12).reshape(1, 12)
LAYER = "model.layers.0.mlp.up_proj"


# ----- helpers -----
def _snapshot(model):
    """Parameter objects and their values, to assert that a failed call changed nothing."""
    params = dict(model.named_parameters())
    values = {n: (p.dequantize() if isinstance(p, Any4Tensor) else p.detach()).clone() for n, p in params.items()}
    return params, values


def _assert_unchanged(model, snapshot):
    params, values = snapshot
    now = dict(model.named_parameters())
    assert now.keys() == params.keys()
    for n, p in params.items():
        assert now[n] is p, f"{n} was replaced"
        v = p.dequantize() if isinstance(p, Any4Tensor) else p.detach()
        assert torch.equal(v, values[n]), f"{n} changed"


def _read_header(path):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _write_header(path, header, body):
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _flip_byte(path, key, offset=3, bit=0x10):
    header, body = _read_header(path)
    start = header[key]["data_offsets"][0]
    body = bytearray(body)
    body[start + offset] ^= bit
    _write_header(path, header, bytes(body))


def _edit_meta(path, name, edit):
    header, body = _read_header(path)
    meta = json.loads(header["__metadata__"][name])
    edit(meta)
    header["__metadata__"][name] = json.dumps(meta)
    _write_header(path, header, body)


def _forge(path, edit_tensors=lambda t: None, edit_meta=lambda m: None, algorithm=None):
    """Rewrite the file with edited tensors / metadata and *recomputed* checksums: what a buggy
    writer (or a deliberate forger) produces; only the structural and value checks can catch it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit_tensors(tensors)
    edit_meta(meta)
    names = [n for n, v in meta.items() if '"Any4Tensor"' in v]
    if algorithm is not None:
        meta["any4ao_checksum_algorithm"] = algorithm
    if CHECKSUM_KEY in meta:  # (an edit that removes the checksums keeps them removed)
        keys = [k for k in names + ["tensor_names", "any4ao_aliases"] if k in meta]
        meta[CHECKSUM_KEY] = json.dumps(checksums(tensors, meta, keys, algorithm=algorithm or CHECKSUM_ALGORITHM))
    save_file(tensors, str(path), metadata=meta)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A quantized tiny Llama, its safetensors file and its save_pretrained directory."""
    root = tmp_path_factory.mktemp("adversarial")
    model = tiny_llama()
    quantize_model(model, CONFIG, progress=False)
    save_quantized(model, root / "q.safetensors", CONFIG)
    model.save_pretrained(root / "hf")
    return model, root


@pytest.fixture
def copy(saved, tmp_path):
    shutil.copy(saved[1] / "q.safetensors", tmp_path / "q.safetensors")
    return tmp_path / "q.safetensors"


# ----- load_quantized: damaged bytes are caught by the checksums, naming file and tensor -----
@pytest.mark.parametrize("part", ["qdata", "lut", "scale", "zero_point"])
def test_one_flipped_byte_in_any_part_is_a_checksum_error(copy, part):
    _flip_byte(copy, f"{LAYER}._weight_{part}")
    fresh = tiny_llama(seed=1)
    before = _snapshot(fresh)
    with pytest.raises(ChecksumError, match=rf"q\.safetensors: tensor '{LAYER}\._weight_{part}' is corrupt"):
        load_quantized(copy, fresh)
    _assert_unchanged(fresh, before)


def test_flipped_byte_in_a_plain_tensor_is_a_checksum_error(copy):
    _flip_byte(copy, "lm_head.weight")
    with pytest.raises(ChecksumError, match="'lm_head.weight' is corrupt"):
        load_quantized(copy)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["_data"].update(block_size=[1, 48]),  # group 32 -> 48: same number of groups for K=64
        lambda m: m["_data"].update(transposed=True),  # on a square weight every shape still fits
        lambda m: m["_data"].update(kernel_preference="dequantize"),
    ],
    ids=["group-size", "transposed", "kernel-preference"],
)
def test_edited_metadata_that_still_fits_the_shapes_is_a_checksum_error(copy, edit):
    _edit_meta(copy, "model.layers.0.self_attn.q_proj.weight", edit)  # q_proj is 64 x 64
    with pytest.raises(ChecksumError, match=r"metadata of 'model\.layers\.0\.self_attn\.q_proj\.weight'"):
        load_quantized(copy)


def _edit_header(path, key, edit):
    header, body = _read_header(path)
    edit(header[key])
    _write_header(path, header, body)


def _edit_dtype(path, key, dtype):
    _edit_header(path, key, lambda entry: entry.update(dtype=dtype))


@pytest.mark.parametrize("key", ["lm_head.weight", f"{LAYER}._weight_scale"])
def test_header_dtype_edited_to_one_of_the_same_width_is_a_checksum_error(copy, key):
    """F32 -> I32 keeps every byte and offset: only the checksum of dtype and shape sees it."""
    _edit_dtype(copy, key, "I32")
    fresh = tiny_llama(seed=1)
    before = _snapshot(fresh)
    with pytest.raises(ChecksumError, match=rf"q\.safetensors: tensor '{re.escape(key)}' is corrupt"):
        load_quantized(copy, fresh)
    _assert_unchanged(fresh, before)


@pytest.mark.parametrize(
    "key, raw, verify",
    [
        (CHECKSUM_KEY, "1", True),
        (CHECKSUM_KEY, "null", True),
        (CHECKSUM_KEY, "[1]", True),
        ("tensor_names", "5", True),
        ("tensor_names", "null", False),
        ("any4ao_aliases", "[1]", False),
        ("any4ao_aliases", "null", False),
        ("any4ao_aliases", '{"x": ["y"]}', False),
    ],
)
def test_damaged_name_and_checksum_entries_are_checkpoint_errors(copy, key, raw, verify):
    """One header edit of a JSON entry the loader walks: a CheckpointError naming file and entry,
    not a TypeError or AttributeError from inside the loader."""
    header, body = _read_header(copy)
    header["__metadata__"][key] = raw
    _write_header(copy, header, body)
    with pytest.raises(CheckpointError, match=rf"q\.safetensors: metadata entry '{key}' is not a"):
        load_quantized(copy, verify_checksums=verify)


def test_removed_checksums_fail_unless_opted_out(copy, saved):
    _forge(copy, edit_meta=lambda m: m.pop(CHECKSUM_KEY))
    with pytest.raises(ChecksumError, match="no checksums"):
        load_quantized(copy)
    fresh = tiny_llama(seed=1)
    load_quantized(copy, fresh, verify_checksums=False)
    assert torch.equal(fresh(IDS).logits, saved[0](IDS).logits)


@pytest.mark.parametrize("entry", ["tensor_names", "any4ao_aliases"])
def test_name_list_and_aliases_must_have_their_checksums(copy, entry):
    """Without these, an alias edited to point one layer at another's weight loaded unchecked."""

    def drop(meta):
        sums = json.loads(meta[CHECKSUM_KEY])
        sums.pop(f"meta:{entry}")
        meta[CHECKSUM_KEY] = json.dumps(sums)

    header, body = _read_header(copy)
    drop(header["__metadata__"])
    _write_header(copy, header, body)
    with pytest.raises(ChecksumError, match=rf"no checksum of the metadata of \['{entry}'\]"):
        load_quantized(copy)


@pytest.mark.parametrize("algorithm, version", [("crc32", "2"), ("xxh3_64", "3")])
def test_files_with_older_checksums_load_and_are_verified(copy, saved, algorithm, version):
    """Files from any4ao 0.2.0 carry crc32 checksums, later ones xxh3_64 of the bytes alone (before
    the checksums covered dtype and shape): they still load, and a flipped byte in one still fails."""
    _forge(copy, edit_meta=lambda m: m.update(any4ao_format=version), algorithm=algorithm)
    fresh = tiny_llama(seed=1)
    load_quantized(copy, fresh)
    assert torch.equal(fresh(IDS).logits, saved[0](IDS).logits)
    _flip_byte(copy, f"{LAYER}._weight_lut")
    with pytest.raises(ChecksumError, match=rf"tensor '{LAYER}\._weight_lut' is corrupt: its {algorithm} "):
        load_quantized(copy)


def test_unknown_checksum_algorithm_is_an_error(copy):
    """An algorithm this version does not know is an error, not a skipped check."""
    _forge(copy, edit_meta=lambda m: m.update(any4ao_checksum_algorithm="md5"))
    with pytest.raises(ChecksumError, match="unknown checksum algorithm 'md5'"):
        load_quantized(copy)


# ----- load_quantized: values and structure, with consistent (forged) checksums -----
def _set(key, fn):
    def edit(tensors):
        tensors[key] = fn(tensors[key].clone())

    return edit


def _nan_row(t):
    t[2] = float("nan")
    return t


def _inf_first(t):
    t.view(-1)[0] = float("inf")
    return t


def _unsort(t):
    return t.flip(1)


def _negative(t):
    t[0, 0] = -abs(float(t[0, 0])) - 1
    return t


def _huge(t):
    t[1, 0] = 3e38
    return t


W = f"{LAYER}._weight_"
VALUE_CASES = {
    "nan-lut-row": (_set(W + "lut", _nan_row), "lut has 16 NaN/Inf"),
    "inf-lut": (_set(W + "lut", _inf_first), "lut has 1 NaN/Inf"),
    "unsorted-lut": (_set(W + "lut", _unsort), "lut row 0 is not sorted"),
    "inf-scale": (_set(W + "scale", _inf_first), "scale has 1 NaN/Inf"),
    "nan-zero-point": (_set(W + "zero_point", _nan_row), "zero_point has"),
    "negative-scale": (_set(W + "scale", _negative), "scale has 1 negative"),
    "overflowing-scale": (_set(W + "scale", _huge), "beyond torch.float32's range"),
    "half-width-qdata": (_set(W + "qdata", lambda t: t[:, : t.shape[1] // 2].contiguous()), "qdata has shape"),
    "fp16-scale": (_set(W + "scale", lambda t: t.half()), "must be one float dtype"),
    "2-d-lut-as-1-d": (_set(W + "lut", lambda t: t.reshape(-1)), "lut has shape"),
}


@pytest.mark.parametrize("case", VALUE_CASES, ids=list(VALUE_CASES))
def test_bad_values_with_consistent_checksums_are_rejected_by_name(copy, case):
    edit, message = VALUE_CASES[case]
    _forge(copy, edit_tensors=edit)
    fresh = tiny_llama(seed=1)
    before = _snapshot(fresh)
    with pytest.raises(InvalidAny4TensorError, match=rf"q\.safetensors: tensor '{LAYER}\.weight'.*{message}"):
        load_quantized(copy, fresh)
    _assert_unchanged(fresh, before)


def _meta_edit(name, **changes):
    def edit(meta):
        m = json.loads(meta[name])
        m["_data"].update(changes)
        meta[name] = json.dumps(m)

    return edit


META_CASES = {
    "nbits-3": (dict(nbits=3), InvalidAny4TensorError, "lut has shape"),
    "nbits-4.0": (dict(nbits=4.0), InvalidAny4TensorError, "nbits=4.0"),
    "group-40": (dict(block_size=[1, 40]), InvalidAny4TensorError, "multiple of 16"),
    "block-size-2-rows": (dict(block_size=[2, 32]), InvalidAny4TensorError, "block_size"),
    "shape-doubled": (dict(shape=[160, 128]), InvalidAny4TensorError, "qdata has shape"),
    "shape-float": (dict(shape=[160.0, 64]), InvalidAny4TensorError, "shape"),
    "transposed-string": (dict(transposed="yes"), InvalidAny4TensorError, "transposed"),
    "kernel-cutlass": (dict(kernel_preference="cutlass"), InvalidAny4TensorError, "kernel_preference"),
    "unknown-attribute": (dict(backdoor=1), InvalidAny4TensorError, "attributes"),
}


@pytest.mark.parametrize("case", META_CASES, ids=list(META_CASES))
def test_bad_metadata_with_consistent_checksums_is_rejected_by_name(copy, case):
    changes, error, message = META_CASES[case]
    _forge(copy, edit_meta=_meta_edit(f"{LAYER}.weight", **changes))
    with pytest.raises(error, match=rf"{LAYER}\.weight.*{message}"):
        load_quantized(copy, tiny_llama(seed=1))


def test_file_level_damage_is_a_checkpoint_error(copy, tmp_path):
    cases = []
    for name, make in {
        "missing-part": lambda p: _forge(p, edit_tensors=lambda t: t.pop(W + "lut")),
        "extra-tensor": lambda p: _forge(p, edit_tensors=lambda t: t.update(stray=torch.zeros(2))),
        "unknown-type": lambda p: _forge(
            p, edit_meta=lambda m: m.update({f"{LAYER}.weight": json.dumps({"_type": "Int4Tensor", "_data": {}})})
        ),
        "alias-to-nothing": lambda p: _forge(p, edit_meta=lambda m: m.update(any4ao_aliases='{"a.weight": "nope"}')),
        "old-format": lambda p: _forge(p, edit_meta=lambda m: m.update(any4ao_format="1")),
        "damaged-json": lambda p: _forge(p, edit_meta=lambda m: m.update(tensor_names="[oops")),
        "fractional-shape": lambda p: _edit_header(p, "model.norm.weight", lambda e: e.update(shape=[64.9])),
        "boolean-shape": lambda p: _edit_header(p, "model.norm.weight", lambda e: e.update(shape=[True, 64])),
        "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
        "empty": lambda p: p.write_bytes(b""),
        "random-bytes": lambda p: p.write_bytes(bytes(range(256)) * 8),
    }.items():
        path = tmp_path / f"{name}.safetensors"
        shutil.copy(copy, path)
        make(path)
        cases.append((name, path))
    fresh = tiny_llama(seed=1)
    before = _snapshot(fresh)
    for name, path in cases:
        with pytest.raises(CheckpointError, match=rf"{name}\.safetensors") as info:
            load_quantized(path, fresh)
        assert type(info.value) is CheckpointError, name
    _assert_unchanged(fresh, before)
    with pytest.raises(CheckpointError, match="is a directory"):
        load_quantized(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_quantized(tmp_path / "nope.safetensors")


def test_three_bit_codes_above_7_and_padding_codes_are_rejected(tmp_path):
    torch.manual_seed(0)
    layer = nn.Linear(65, 8)  # K odd: the last byte of every row holds one padding nibble
    quantize_(layer, Any4WeightOnlyConfig(codebook="any3", group_size=16, kmeans_iterations=1))
    path = tmp_path / "any3.safetensors"
    save_quantized(layer, path)
    bad = {
        "above-7": (lambda t: t["_weight_qdata"].view(-1)[5:6].bitwise_or_(0x80), "3-bit codes above 7 in row 0"),
        "padding": (lambda t: t["_weight_qdata"][3, -1:].bitwise_or_(0x30), "padding codes beyond in_features=65"),
    }
    for name, (edit, message) in bad.items():
        p = tmp_path / f"{name}.safetensors"
        shutil.copy(path, p)
        _forge(p, edit_tensors=edit)
        with pytest.raises(InvalidAny4TensorError, match=rf"{name}\.safetensors: tensor 'weight'.*{message}"):
            load_quantized(p)
    assert torch.equal(load_quantized(path)["weight"].dequantize(), layer.weight.dequantize())


# ----- load_quantized into models -----
def test_model_mismatches_are_checkpoint_errors_and_change_nothing(saved):
    path = saved[1] / "q.safetensors"
    for other in (tiny_llama(hidden=96, intermediate=160), tiny_llama(layers=1), tiny_llama(vocab=64)):
        before = _snapshot(other)
        with pytest.raises(CheckpointError, match=r"q\.safetensors"):
            load_quantized(path, other)
        _assert_unchanged(other, before)
    with pytest.raises(CheckpointError, match="has no parameters or buffers"):
        load_quantized(path, nn.Module())
    with pytest.raises(TypeError, match="nn.Module"):
        load_quantized(path, {"not": "a model"})
    with torch.device("meta"):
        meta = tiny_llama()
    with pytest.raises(CheckpointError, match="meta device"):
        load_quantized(path, meta)


def test_loading_into_a_model_that_is_already_quantized_differently_replaces_every_tensor(saved):
    model, root = saved
    other = tiny_llama(seed=3)
    quantize_model(
        other,
        Any4WeightOnlyConfig(codebook="int4", group_size=64),
        filter_fn=lambda m, n: isinstance(m, nn.Linear),
        progress=False,
    )
    assert isinstance(other.lm_head.weight, Any4Tensor)
    load_quantized(root / "q.safetensors", other)
    assert not isinstance(other.lm_head.weight, Any4Tensor)
    assert torch.equal(other(IDS).logits, model(IDS).logits)


def test_loading_into_a_model_of_another_dtype_takes_the_models_dtype(saved):
    """As load_state_dict casts into the model's parameters: an fp32 file into a bf16 model gives
    bf16 Any4Tensor weights (they stayed fp32, and every forward then raised a dtype mismatch)."""
    model, root = saved
    half = tiny_llama(seed=1).to(torch.bfloat16)
    load_quantized(root / "q.safetensors", half)
    weight = half.model.layers[0].mlp.up_proj.weight
    assert isinstance(weight, Any4Tensor) and weight.dtype == torch.bfloat16
    torch.testing.assert_close(half(IDS).logits.float(), model(IDS).logits, atol=0.05, rtol=0.05)


def test_failure_while_installing_rolls_back(saved, monkeypatch):
    fresh = tiny_llama(seed=1)
    before = _snapshot(fresh)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure in load_state_dict")

    monkeypatch.setattr(fresh, "load_state_dict", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        load_quantized(saved[1] / "q.safetensors", fresh)
    _assert_unchanged(fresh, before)


# ----- save_quantized: all or nothing -----
def test_save_failures_leave_the_existing_file_intact(saved, copy, monkeypatch):
    original = copy.read_bytes()
    with torch.device("meta"):
        meta = tiny_llama()
    with pytest.raises(CheckpointError, match="meta device"):
        save_quantized(meta, copy)

    class Odd(torch.Tensor):
        pass

    with pytest.raises(CheckpointError, match="'w' is a Odd"):
        save_quantized({"w": torch.zeros(2).as_subclass(Odd)}, copy)
    # names that collide with a quantized weight's stored parts or with the file's metadata entries
    q = saved[0].state_dict()[f"{LAYER}.weight"]
    for clash, message in [
        ({"a.weight": q, "a._weight_scale": torch.ones(2)}, "part of the quantized 'a.weight'"),
        ({"format": torch.ones(2)}, "metadata entry"),
        ({"tensor_names": torch.ones(2), "w": q}, "metadata entry"),
        ({"__metadata__": torch.ones(2)}, "metadata entry"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            save_quantized(clash, copy)
    assert copy.read_bytes() == original
    import safetensors.torch

    def half_written(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(saved[0], copy)
    assert copy.read_bytes() == original
    assert sorted(p.name for p in copy.parent.iterdir()) == ["q.safetensors"]  # no temporary left behind
    with pytest.raises(CheckpointError, match="is a directory"):
        save_quantized({"w": torch.zeros(2)}, copy.parent)
    with pytest.raises(CheckpointError, match=r"nope[/\\]q\.safetensors: the directory .*nope does not exist"):
        save_quantized({"w": torch.zeros(2)}, copy.parent / "nope" / "q.safetensors")
    with pytest.raises(TypeError, match="config must be an Any4WeightOnlyConfig, got dict"):
        save_quantized(saved[0], copy, config={"group_size": 32})
    assert copy.read_bytes() == original


def _tied_llama(seed=0):
    return tiny_llama(layers=1, seed=seed, tie=True)


def test_untied_file_into_a_tied_model_is_refused(tmp_path):
    """Two different tensors for one tied parameter: whichever came last used to win silently."""
    save_quantized(tiny_llama(layers=1, tie=False, seed=1), tmp_path / "untied.safetensors")
    tied = _tied_llama(seed=2)
    before = _snapshot(tied)
    with pytest.raises(CheckpointError, match="one tied parameter.*different values"):
        load_quantized(tmp_path / "untied.safetensors", tied)
    _assert_unchanged(tied, before)


def test_quantize_of_a_tied_lm_head_round_trips_through_save_pretrained(tmp_path):
    """torchao's quantize_ (default filter) quantizes a tied lm_head and leaves the embedding a
    float tensor; transformers compares the two with torch.equal when it loads (it raised
    NotImplementedError for Any4Tensor, so the checkpoint could not be loaded)."""
    from transformers import AutoModelForCausalLM

    model = _tied_llama()
    quantize_(model, CONFIG)
    model.save_pretrained(tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert isinstance(loaded.lm_head.weight, Any4Tensor)
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    w = model.lm_head.weight
    assert torch.equal(w, w.clone()) and not torch.equal(w, w.dequantize()) and not torch.equal(w.dequantize(), w)
    other = Any4Tensor.from_hp(w.dequantize(), group_size=64, kmeans_iterations=1)  # another layout
    assert not torch.equal(w, other)


def test_tied_embeddings_save_and_load_both_ways(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _tied_llama()
    quantize_model(model, CONFIG, progress=False)
    save_quantized(model, tmp_path / "tied.safetensors")
    fresh = _tied_llama(seed=1)
    load_quantized(tmp_path / "tied.safetensors", fresh)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert torch.equal(fresh(IDS).logits, model(IDS).logits)
    model.save_pretrained(tmp_path / "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert torch.equal(reloaded(IDS).logits, model(IDS).logits)


# ----- transformers: save_pretrained works for quantize_ models, from_pretrained validates -----
def test_save_pretrained_of_quantize_model_round_trips_and_leaves_the_model_as_it_was(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    model, root = saved
    assert getattr(model, "hf_quantizer", None) is None  # the temporary quantizer is gone again
    config = json.loads((root / "hf" / "config.json").read_text())
    assert config["quantization_config"]["quant_type"]["default"]["_type"] == "Any4WeightOnlyConfig"
    reloaded = AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32)
    assert isinstance(reloaded.model.layers[1].mlp.down_proj.weight, Any4Tensor)
    assert torch.equal(reloaded(IDS).logits, model(IDS).logits)
    # quantize_ (torchao) with the head quantized too, saved over an existing checkpoint
    other = tiny_llama(seed=2)
    quantize_(other, Any4WeightOnlyConfig(codebook="nf4", group_size=32))
    shutil.copytree(root / "hf", tmp_path / "hf")
    other.save_pretrained(tmp_path / "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert isinstance(reloaded.lm_head.weight, Any4Tensor)
    assert torch.equal(reloaded(IDS).logits, other(IDS).logits)


def test_save_pretrained_that_cannot_work_fails_before_writing(saved, tmp_path):
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    model = tiny_llama()
    quantize_model(model, CONFIG, progress=False)
    model.hf_quantizer = TorchAoHfQuantizer(TorchAoConfig(quant_type=Int8WeightOnlyConfig()))
    with pytest.raises(ValueError, match="Int8WeightOnlyConfig"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _hf_copy(saved, tmp_path):
    shutil.copytree(saved[1] / "hf", tmp_path / "hf")
    return tmp_path / "hf" / "model.safetensors"


def test_from_pretrained_of_damaged_checkpoints_names_weight_and_file(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    path = _hf_copy(saved, tmp_path)
    good = path.read_bytes()
    _flip_byte(path, f"{LAYER}._weight_qdata")
    with pytest.raises(ChecksumError, match=rf"model\.safetensors: tensor '{LAYER}\._weight_qdata' is corrupt"):
        AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32)
    path.write_bytes(good)
    _edit_meta(path, "model.layers.0.self_attn.q_proj.weight", lambda m: m["_data"].update(block_size=[1, 48]))
    with pytest.raises(ChecksumError, match="q_proj.weight.*was edited"):
        AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32)
    path.write_bytes(good)
    _forge(path, edit_tensors=_set(W + "lut", _nan_row))
    with pytest.raises(InvalidAny4TensorError, match=rf"model\.safetensors: weight '{LAYER}\.weight'.*NaN"):
        AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32)
    path.write_bytes(good)
    _forge(path, edit_tensors=_set(W + "qdata", lambda t: t[:, :16].contiguous()))
    with pytest.raises(InvalidAny4TensorError, match=rf"model\.safetensors: weight '{LAYER}\.weight'.*qdata has shape"):
        AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32)
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors"):
        AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32)


def test_from_pretrained_of_a_file_stripped_of_its_checksums_fails_unless_opted_out(saved, tmp_path, monkeypatch):
    """Deleting the checksum entries must not turn verification off (the helper's audit loaded a
    flipped scale that way); the module flag is the opt-out."""
    from transformers import AutoModelForCausalLM

    from any4ao.integrations import transformers_loading

    path = _hf_copy(saved, tmp_path)
    _flip_byte(path, f"{LAYER}._weight_scale")
    header, body = _read_header(path)
    header["__metadata__"].pop(CHECKSUM_KEY)
    header["__metadata__"].pop("any4ao_checksum_algorithm", None)
    _write_header(path, header, body)
    with pytest.raises(ChecksumError, match=r"model\.safetensors: weight '.*' is an Any4Tensor but the file holds no"):
        AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32)
    monkeypatch.setattr(transformers_loading, "VERIFY_CHECKSUMS", False)
    AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32)


def test_from_pretrained_of_a_header_dtype_edit_is_a_checksum_error(tmp_path):
    """BF16 -> F16 on an Any4Tensor's float parts keeps the bytes and the parts' agreement: only the
    checksum over dtype and shape sees it (the helper's audit found it loading as wrong values)."""
    from transformers import AutoModelForCausalLM

    model = tiny_llama(layers=1, dtype=torch.bfloat16)
    quantize_model(model, CONFIG, progress=False)
    model.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    for part in ("lut", "scale", "zero_point"):
        _edit_dtype(path, f"{LAYER}._weight_{part}", "F16")
    with pytest.raises(ChecksumError, match=rf"model\.safetensors: tensor '{LAYER}\._weight_lut' is corrupt"):
        AutoModelForCausalLM.from_pretrained(path.parent)


# ----- torch.save / torch.load(weights_only=True) -----
def _pickled(mutate):
    t = Any4Tensor.from_hp(torch.randn(16, 64), codebook="any3", group_size=32, kmeans_iterations=1)
    mutate(t.__dict__)
    buf = io.BytesIO()
    torch.save({"w": t}, buf)
    buf.seek(0)
    return buf


PICKLE_CASES = {
    "half-width-qdata": (lambda d: d.update(qdata=d["qdata"][:, :16].clone()), "qdata has shape"),
    "nan-lut": (lambda d: d["lut"].view(-1)[3:4].fill_(float("nan")), "lut has 1 NaN"),
    "codes-above-7": (lambda d: d["qdata"].view(-1)[0:1].bitwise_or_(0x08), "3-bit codes above 7"),
    "unsorted-lut": (lambda d: d.update(lut=d["lut"].flip(1).contiguous()), "not sorted"),
    "nbits-5": (lambda d: d.update(nbits=5), "nbits=5"),
    "bf16-scale": (lambda d: d.update(scale=d["scale"].bfloat16()), "one float dtype"),
    "missing-part": (lambda d: d.pop("zero_point"), "parts missing"),
    "kernel-preference": (lambda d: d.update(kernel_preference="cutlass"), "kernel_preference"),
}


@pytest.mark.parametrize("case", PICKLE_CASES, ids=list(PICKLE_CASES))
def test_torch_load_weights_only_checks_every_tensor(case):
    mutate, message = PICKLE_CASES[case]
    buf = _pickled(mutate)
    with pytest.raises(InvalidAny4TensorError, match=rf"unpickled by torch\.load \(shape \(16, 64\).*{message}"):
        torch.load(buf, weights_only=True)


# ----- quantization inputs -----
def test_quantize_inputs_name_the_layer_and_change_nothing():
    ids = torch.randint(0, 128, (1, 8))
    cases = []
    model = tiny_llama()
    with torch.no_grad():
        model.get_submodule(LAYER).weight.mul_(1e6)
    cases.append((model, Any4WeightOnlyConfig(group_size=32, lut_dtype=torch.float16), "do not fit lut_dtype"))
    model = tiny_llama()
    stats = any4ao.calibrate(model, input_ids=ids)
    stats._sums[model.get_submodule(LAYER)] = torch.zeros(64, dtype=torch.float64)
    cases.append((model, Any4WeightOnlyConfig(group_size=32, calibration=stats), "all zero"))
    model = tiny_llama()
    stats = any4ao.calibrate(model, input_ids=ids)
    stats._sums[model.get_submodule(LAYER)][3] = float("nan")
    cases.append((model, Any4WeightOnlyConfig(group_size=32, calibration=stats), "NaN"))
    for model, config, message in cases:
        before = _snapshot(model)
        with pytest.raises(LayerError, match=rf"{LAYER}.*{message}"):
            quantize_model(model, config, progress=False)
        _assert_unchanged(model, before)
    with torch.device("meta"):
        meta = tiny_llama()
    with pytest.raises(LayerError, match=r"model\.layers\.0\.self_attn\.q_proj.*meta device"):
        quantize_model(meta, CONFIG, progress=False)
    with torch.device("meta"):
        unseen = tiny_llama()  # (default_filter noted the paths of the first one's layers)
    with pytest.raises(LayerError, match=r"Linear\(in_features=64, out_features=64\).*meta device"):
        quantize_(unseen, CONFIG)
    empty = nn.Sequential(nn.Linear(0, 8))
    with pytest.raises(LayerError, match="'0'.*empty"):
        quantize_model(empty, CONFIG, progress=False)


def test_underflowing_calibration_statistics_still_weight_kmeans():
    """Activations near 1e-25: their mean x^2 (1e-50) underflows float32 to zero; normalised in
    float64 first, the statistics keep their relative sizes."""
    model = tiny_llama()
    layer = model.get_submodule(LAYER)
    stats = any4ao.calibrate(model, input_ids=torch.randint(0, 128, (1, 8)))
    stats._sums[layer] = stats._sums[layer] * 1e-50
    assert not bool((stats.for_module(layer) > 0).any())
    assert torch.allclose(
        stats.for_module(layer, normalized=True).double().max(), torch.tensor(1.0, dtype=torch.float64)
    )
    quantize_model(model, Any4WeightOnlyConfig(group_size=32, calibration=stats, kmeans_iterations=2), progress=False)


def test_from_codes_and_the_constructor_reject_bad_parts():
    codes = torch.randint(0, 16, (4, 64))
    lut = torch.arange(16.0).expand(4, 16).contiguous()
    s, z = torch.ones(4, 2), torch.zeros(4, 2)
    good = Any4Tensor.from_codes(codes, lut, s, z, 4, 32)
    bad_calls = {
        "code 16": (lambda: Any4Tensor.from_codes(codes + 1, lut, s, z, 4, 32), "codes must lie in"),
        "negative code": (lambda: Any4Tensor.from_codes(codes - 1, lut, s, z, 4, 32), "codes must lie in"),
        "float codes": (lambda: Any4Tensor.from_codes(codes.float(), lut, s, z, 4, 32), "integer"),
        "unsorted lut": (lambda: Any4Tensor.from_codes(codes, lut.flip(1), s, z, 4, 32), "not sorted"),
        "nan scale": (lambda: Any4Tensor.from_codes(codes, lut, s * float("nan"), z, 4, 32), "scale has 8 NaN"),
        "lut width": (lambda: Any4Tensor.from_codes(codes, lut[:, :8], s, z, 4, 32), "lut has shape"),
        "nbits 4.0": (lambda: Any4Tensor.from_codes(codes, lut, s, z, 4.0, 32), "nbits=4.0"),
        "scale not a tensor": (lambda: Any4Tensor.from_codes(codes, lut, 1.0, z, 4, 32), "scale is a float"),
        "group 24": (lambda: Any4Tensor.from_codes(codes, lut, s, z, 4, 24), "multiple of 16"),
        "constructor devices": (
            lambda: Any4Tensor(good.qdata, lut.to("meta"), s, z, 4, [1, 32], torch.Size([4, 64])),
            "different devices",
        ),
        "constructor zero_point row stride": (
            lambda: Any4Tensor(good.qdata, lut, s, torch.zeros(4, 4).to(s.dtype)[:, :2].copy_(z), 4, [1, 32], (4, 64)),
            "row strides",
        ),
        "constructor transposed": (
            lambda: Any4Tensor(good.qdata, lut, s, z, 4, [1, 32], torch.Size([4, 64]), transposed="no"),
            "transposed",
        ),
    }
    for name, (call, message) in bad_calls.items():
        with pytest.raises(InvalidAny4TensorError, match=message):
            call()


# ----- the ops and the tensor's own operations -----
def test_custom_ops_check_their_arguments():
    import any4ao.kernels.ops  # noqa: F401  registers torch.ops.any4ao.*

    t = Any4Tensor.from_hp(torch.randn(32, 64).bfloat16(), group_size=32, kmeans_iterations=1)
    args = (t.qdata, t.lut, t.scale, t.zero_point)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    lut_linear, dequantize = torch.ops.any4ao.lut_linear, torch.ops.any4ao.dequantize
    # the same zero points as a view of a wider buffer: right values, another row stride than scale's
    zp_view = torch.zeros(32, 8, dtype=torch.bfloat16)[:, :2].copy_(t.zero_point)
    bad = {
        "x K=128": (lambda: lut_linear(torch.randn(4, 128, dtype=torch.bfloat16), *args, 4, 32), "in_features=128"),
        "nbits 2": (lambda: lut_linear(x, *args, 2, 32), "in_features=64 at nbits=2"),
        # K = 63 packs like 64: only the weight's own in_features tells them apart
        "x K=63, weight 64": (
            lambda: lut_linear(x[:, :63].contiguous(), *args, 4, 32, 64),
            r"\(4, 63\).*in_features=64",
        ),
        "nbits 5": (lambda: lut_linear(x, *args, 5, 32), "nbits=5"),
        "group 64": (lambda: lut_linear(x, *args, 4, 64), "scale has shape"),
        "group 20": (lambda: lut_linear(x, *args, 4, 20), "group_size=20"),
        "lut width 8": (lambda: lut_linear(x, t.qdata, t.lut[:, :8], t.scale, t.zero_point, 4, 32), "lut has shape"),
        "int x": (lambda: lut_linear(x.to(torch.int32), *args, 4, 32), "x must be a 2-D float"),
        "3-d x": (lambda: lut_linear(x[None], *args, 4, 32), "x must be a 2-D float"),
        "int8 qdata": (lambda: lut_linear(x, t.qdata.to(torch.int8), *args[1:], 4, 32), "uint8"),
        "mixed scale dtypes": (lambda: lut_linear(x, t.qdata, t.lut, t.scale, t.zero_point.float(), 4, 32), "differ"),
        "strided lut": (
            lambda: lut_linear(x, t.qdata, t.lut.t().contiguous().t(), t.scale, t.zero_point, 4, 32),
            "contiguous",
        ),
        "zero_point row stride": (lambda: lut_linear(x, t.qdata, t.lut, t.scale, zp_view, 4, 32), "row strides"),
        "column-major scale": (  # the message named the lut, which was fine
            lambda: lut_linear(x, t.qdata, t.lut, t.scale.t().contiguous().t(), t.zero_point, 4, 32),
            "scale rows must be unit-stride",
        ),
        "dequantize zero_point row stride": (
            lambda: dequantize(t.qdata, t.lut, t.scale, zp_view, 4, 32, 64, torch.bfloat16),
            "row strides",
        ),
        "dequantize K": (lambda: dequantize(*args, 4, 32, 128, torch.bfloat16), "in_features=128"),
        "dequantize int dtype": (lambda: dequantize(*args, 4, 32, 64, torch.int32), "output dtype"),
    }
    for name, (call, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(ValueError, match="in_features=64"):
        F.linear(torch.randn(3, 32, dtype=torch.bfloat16), t)
    # the transposed weight takes the same dtype check (it dequantized to x's dtype silently)
    with pytest.raises(ValueError, match="input dtype torch.float32 does not match the Any4Tensor dtype"):
        F.linear(torch.randn(3, 32), t.t())


def test_zero_rows_bias_semantics_and_channel_weights_of_the_wrong_length():
    """Audit findings: an empty row slice dequantized / multiplied with a reshape error; addmm with
    beta=0 added a NaN bias that torch.addmm ignores; from_hp took calibration statistics of the
    wrong length to a reshape error."""
    t = Any4Tensor.from_hp(torch.randn(16, 64), group_size=32, kmeans_iterations=1)
    empty = t[5:5]
    assert empty.dequantize().shape == (0, 64) and F.linear(torch.randn(3, 64), empty).shape == (3, 0)
    x, nan_bias = torch.randn(3, 64), torch.full((16,), float("nan"))
    torch.testing.assert_close(torch.addmm(nan_bias, x, t.t(), beta=0), x @ t.dequantize().t())
    with pytest.raises(ValueError, match=r"calibration statistics have shape \(63,\), expected \(64,\)"):
        Any4Tensor.from_hp(torch.randn(16, 64), group_size=32, channel_weight=torch.ones(63))


def test_fp32_weights_at_the_edge_of_range_get_a_hint_that_can_be_followed():
    w = torch.rand(8, 64, generator=torch.Generator().manual_seed(0)) * 3.3e38
    w[:, ::2] *= -1
    with pytest.raises(ValueError, match=r"scale the weights down first \(no wider lut_dtype\)"):
        Any4Tensor.from_hp(w, codebook="int4", group_size=32)


def test_load_state_dict_into_quantized_weights_checks_layout_and_range():
    """load_state_dict copies into a quantized parameter with copy_: from another layout (group
    size, a float tensor) it names both; into a narrower dtype it refuses values that would become
    Inf, as .to(dtype) does (it used to cast the zero points to Inf silently)."""
    cfg = Any4WeightOnlyConfig(group_size=16, kmeans_iterations=1, refine_rounds=0)
    big = tiny_llama(layers=1)
    with torch.no_grad():
        for p in big.parameters():
            p.mul_(1e6)
    quantize_(big, cfg)
    half = tiny_llama(layers=1).half()
    quantize_(half, cfg)
    weight = "model.layers.0.self_attn.q_proj.weight"
    before = half.state_dict()[weight].zero_point.clone()
    with pytest.raises(RuntimeError, match=rf"{weight}.*cannot be converted from torch.float32 to torch.float16"):
        half.load_state_dict(big.state_dict())
    assert torch.equal(half.state_dict()[weight].zero_point, before)
    other = tiny_llama(layers=1)
    quantize_(other, Any4WeightOnlyConfig(group_size=32, kmeans_iterations=1, refine_rounds=0))
    with pytest.raises(RuntimeError, match=r"group_size=32.*from an Any4Tensor.*group_size=16"):
        other.load_state_dict(big.state_dict())
    with pytest.raises(RuntimeError, match=r"copy_ into a Parameter"):
        tiny_llama(layers=1).load_state_dict(big.state_dict())
    same = tiny_llama(layers=1, seed=3)
    quantize_(same, cfg)
    same.load_state_dict(big.state_dict())
    assert torch.equal(same(IDS).logits, big(IDS).logits)


def test_narrowing_dtype_that_would_overflow_is_refused():
    t = Any4Tensor.from_hp(torch.randn(8, 64) * 1e6, group_size=32, kmeans_iterations=1)
    with pytest.raises(ValueError, match="float32 to torch.float16"):
        t.to(torch.float16)
    assert t.to(torch.bfloat16).dtype == torch.bfloat16
    model = tiny_llama(layers=1)
    quantize_model(model, CONFIG, progress=False, calibration="none")
    model.model.layers[0].mlp.down_proj.weight.lut.mul_(1e6)  # values past fp16's range
    with pytest.raises(
        ValueError, match="stops at this weight: parameters converted before it are already torch.float16"
    ):
        model.half()  # torch converts parameter by parameter: the message says where it stopped


def test_narrowing_dtype_that_would_underflow_the_scales_is_refused():
    """Weights ~1e-8 in fp32 -> fp16: the group scales go subnormal (139 % relative error)."""
    t = Any4Tensor.from_hp(torch.randn(8, 64) * 1e-8, group_size=32, kmeans_iterations=1)
    with pytest.raises(ValueError, match="fall below torch.float16's normal range"):
        t.to(torch.float16)
    assert t.to(torch.bfloat16).dtype == torch.bfloat16  # bf16 keeps fp32's exponent range
    ok = Any4Tensor.from_hp(torch.randn(8, 64) * 1e-2, group_size=32, kmeans_iterations=1)
    assert ok.to(torch.float16).dtype == torch.float16


# ----- numerics: extreme magnitudes stay finite and no worse than int4 -----
def _rel(t, w):
    d = t.dequantize(torch.float64)
    return float((d - w.double()).norm() / w.double().norm())


@given(
    exponent=st.sampled_from([-30, -20, -5, 0, 5, 20, 30]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_scaled_weights_stay_finite_and_no_worse_than_int4(exponent, dtype, seed):
    w = (torch.randn(12, 96, generator=torch.Generator().manual_seed(seed)) * 10.0**exponent).to(dtype)
    learned = Any4Tensor.from_hp(w, group_size=32, kmeans_iterations=5)
    grid = Any4Tensor.from_hp(w, codebook="int4", group_size=32)
    assert bool(torch.isfinite(learned.dequantize()).all())
    assert _rel(learned, w) <= _rel(grid, w) * (1 + 1e-4)


@given(seed=st.integers(0, 2**16), codebook=st.sampled_from(["any4", "int4", "nf4", "fp4", "any3", "int2"]))
def test_fp16_weights_near_65504_and_fp32_denormals_dequantize_finite(seed, codebook):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(12, 96, generator=g)
    for w in ((base / base.abs().max() * 65504).half(), base * 1e-40):
        t = Any4Tensor.from_hp(w, codebook=codebook, group_size=32, kmeans_iterations=5)
        assert bool(torch.isfinite(t.dequantize()).all())
        t.validate_values()
        if codebook in ("any4", "any3"):
            grid = Any4Tensor.from_hp(w, codebook=f"int{codebook[-1]}", group_size=32)
            assert _rel(t, w) <= _rel(grid, w) * (1 + 1e-4)


@pytest.mark.parametrize("codebook", ["int4", "any4", "nf4"])
def test_weights_whose_group_scale_rounds_to_zero_are_refused(codebook):
    """Weights of std 1e-9 under an fp16 LUT: the scale rounded to 0 and every weight became the zero point
    (at std 1e-7 int4 already gave an error 1.3x the weights' own size). A group that only spreads by rounding still
    quantizes."""
    w = torch.randn(4, 256, generator=torch.Generator().manual_seed(0)) * 1e-9
    with pytest.raises(ValueError, match=r"row \d+, group \d+: .* group scale rounds to 0"):
        Any4Tensor.from_hp(w, codebook=codebook, group_size=64, lut_dtype=torch.float16)
    near_constant = torch.ones(4, 256) + torch.rand(4, 256) * 1e-7
    t = Any4Tensor.from_hp(near_constant, codebook=codebook, group_size=64, lut_dtype=torch.float16)
    assert _rel(t, near_constant) < 1e-3
    tiny_group = torch.randn(4, 256) * 0.02  # one group of tiny weights in rows of ordinary ones
    tiny_group[:, 64:128] *= 1e-7
    t = Any4Tensor.from_hp(tiny_group, codebook=codebook, group_size=64, lut_dtype=torch.float16)
    assert _rel(t, tiny_group) < 0.2


# ----- second audit of the session of 2026-12-07 (older surfaces) -----
CFG = Any4WeightOnlyConfig(group_size=32, kmeans_iterations=2)


def test_gpt2_conv1d_layers_are_refused_by_name_and_nothing_quantized_is_an_error():
    """transformers' Conv1D stores (in, out): quantized as a Linear it grouped output channels and
    weighted them with input-channel statistics, silently. Selected, it is a LayerError naming the
    layer; a model where the filter selects nothing (GPT-2 under the default filter) is an error,
    not a silent float model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=100, n_positions=32)).eval()
    before = _snapshot(model)
    with pytest.raises(LayerError, match="nothing would be quantized.*Conv1D"):
        quantize_model(model, CFG, progress=False)
    conv = lambda m, fqn: type(m).__name__ == "Conv1D"  # noqa: E731
    with pytest.raises(LayerError, match=r"transformer\.h\.0\.attn\.c_attn.*Conv1D.*\(in_features, out_features\)"):
        quantize_model(model, CFG, filter_fn=conv, progress=False)
    _assert_unchanged(model, before)
    quantize_model(tiny := tiny_llama(), CFG, progress=False)
    quantize_model(tiny, CFG, progress=False)  # a quantized model: nothing left to do, no error


def test_quantize_on_load_that_quantizes_nothing_is_an_error(tmp_path):
    """from_pretrained(..., quantization_config=TorchAoConfig(Any4WeightOnlyConfig())) of GPT-2
    returned the float model (torchao's filter selects nn.Linear, GPT-2 has Conv1D): an error."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, TorchAoConfig

    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=100, n_positions=32)).save_pretrained(
        tmp_path / "gpt2"
    )
    with pytest.raises(LayerError, match="no layer of the GPT2LMHeadModel was quantized.*Conv1D"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2", quantization_config=TorchAoConfig(quant_type=CFG))


def test_parametrized_and_weight_normed_layers_are_refused_before_anything_changes():
    from torch.nn.utils import parametrizations, weight_norm

    for wrap in (parametrizations.weight_norm, weight_norm):
        model = nn.Sequential(nn.Linear(96, 96), wrap(nn.Linear(96, 96)))
        before = _snapshot(model)
        with pytest.raises(LayerError, match="layer '1'.*parametrization or weight norm"):
            quantize_model(model, CFG, progress=False)
        _assert_unchanged(model, before)
        assert not any(isinstance(p, Any4Tensor) for p in model.parameters())


def test_layers_sharing_a_weight_share_its_quantized_copy():
    a, b = nn.Linear(96, 48), nn.Linear(96, 48)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), nn.Linear(48, 96), b)
    quantize_model(model, CFG, progress=False)
    assert a.weight is b.weight and isinstance(a.weight, Any4Tensor)
    assert len(list(model.parameters())) == 5


def test_tensor_idioms_compute_or_refuse():
    """w.T works (x @ w.T was a NotImplementedError); `.data = t` is refused (it left the packed
    weight unchanged, silently); addmm checks the bias as torch.addmm does (it broadcast a 3-D bias
    and promoted to float64); dequantize takes floating dtypes only (int32 truncated silently)."""
    w = Any4Tensor.from_hp(torch.randn(48, 96, generator=torch.Generator().manual_seed(0)), CFG)
    x = torch.randn(3, 96)
    dense = w.dequantize()
    torch.testing.assert_close(x @ w.T, x @ dense.T)
    assert torch.equal(w.T.dequantize(), dense.T) and torch.equal(w.permute(0, 1).dequantize(), dense)
    param = nn.Parameter(w, requires_grad=False)
    with pytest.raises(NotImplementedError, match="assigning .data of an Any4Tensor"):
        param.data = torch.zeros(48, 96)
    torch.testing.assert_close(torch.addmm(torch.ones(48), x, w.t()), x @ dense.t() + 1)
    with pytest.raises(ValueError, match="does not broadcast"):
        torch.addmm(torch.zeros(2, 3, 48), x, w.t())
    with pytest.raises(ValueError, match="bias dtype torch.float64"):
        torch.addmm(torch.zeros(48, dtype=torch.float64), x, w.t())
    for dtype in ("float16", torch.int32):
        with pytest.raises(ValueError, match="floating torch.dtype"):
            w.dequantize(dtype)
    x3 = torch.randn(2, 3, 96)
    torch.testing.assert_close(x3 @ w.T, x3 @ dense.T)  # matmul reshapes batched x itself
    for call in (lambda: torch.mm(x3, w.t()), lambda: torch.addmm(torch.ones(48), x[0], w.t())):
        with pytest.raises(RuntimeError, match="mat1 must be a matrix"):  # as torch.mm / torch.addmm
            call()


def test_empty_calibration_text_is_an_error_not_the_default_prompt():
    from any4ao import calibrate

    class Tokenizer:
        def __call__(self, text, return_tensors):
            raise AssertionError("not reached")

    for text in ("", "   "):
        with pytest.raises(ValueError, match="text must be non-empty"):
            calibrate(tiny_llama(), Tokenizer(), text=text)


def test_a_quantized_weight_that_asks_for_gradients_warns_when_used_with_grad():
    """requires_grad=True on an Any4Tensor was accepted in silence and no gradient ever came (full
    fine-tuning trained nothing): a forward with gradients enabled warns; inference does not."""
    lin = nn.Linear(96, 48)
    quantize_model(nn.Sequential(lin), CFG, progress=False)
    x = torch.randn(2, 96)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lin(x)  # requires_grad False: no warning
        lin.requires_grad_(True)
        with torch.no_grad():
            lin(x)
    with pytest.warns(UserWarning, match="requires_grad=True but gets no gradient"):
        lin(x)


# --- calibration as quantize_model's default (third audit) ---


def _dropout_llama():
    model = tiny_llama()
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    return model


def test_calibration_runs_in_eval_mode_and_restores_each_flag():
    """A model in train mode (dropout on) gave statistics up to 3.8x off and drew on the global RNG."""
    reference = any4ao.calibrate(_dropout_llama().eval(), input_ids=IDS)
    model = _dropout_llama().train()
    model.model.layers[1].eval()  # a mixed model: each flag comes back as it was
    flags = {name: m.training for name, m in model.named_modules()}
    rng = torch.get_rng_state()
    stats = any4ao.calibrate(model, input_ids=IDS)
    assert torch.equal(torch.get_rng_state(), rng)
    assert {name: m.training for name, m in model.named_modules()} == flags
    layer, ref_layer = (m.model.layers[0].self_attn.o_proj for m in (model, _dropout_llama()))
    ref_stats = reference.for_module(next(m for n, m in reference.names.items() if n.endswith("0.self_attn.o_proj")))
    assert torch.allclose(stats.for_module(layer), ref_stats, rtol=1e-6)


def test_quantized_models_are_freed_with_their_calibration():
    """The torchao handler kept each layer's config, whose calibration holds the layers: the model and
    its Hessians stayed alive after `del`."""
    import gc
    import weakref

    model = tiny_llama()
    quantize_model(model, CONFIG, progress=False)  # calibrated on random ids by default
    gone = weakref.ref(model.model.layers[0].mlp.up_proj)
    del model
    gc.collect()
    assert gone() is None


def test_random_ids_and_text_fit_the_model_they_calibrate():
    model = tiny_llama()
    model.config.vocab_size = 1000  # larger than the embedding's 128 rows: the embedding decides
    assert int(any4ao.random_token_ids(model, tokens=2000).max()) < 128
    with pytest.raises(ValueError, match=r"lie in \[0, 128\) \(the model's vocabulary"):
        any4ao.calibrate(model, input_ids=torch.tensor([[5, 200]]))
    model.config.max_position_embeddings = 16  # a learned position table has no row 16
    stats = any4ao.calibrate(model, input_ids=torch.randint(0, 128, (1, 50)))
    assert stats.tokens_seen(model.model.layers[0].mlp.up_proj) == 16


def test_a_linear_called_by_keyword_is_recorded():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.proj = nn.Embedding(10, 32), nn.Linear(32, 32)

        def get_input_embeddings(self):
            return self.embed

        def forward(self, input_ids):
            return self.proj(input=self.embed(input_ids))

    model = Keyword()
    assert any4ao.calibrate(model, input_ids=torch.tensor([[1, 2, 3]])).tokens_seen(model.proj) == 3


def test_default_calibration_with_a_meta_head_still_calibrates_and_twice_is_a_no_op():
    model, plain = tiny_llama(), tiny_llama()
    model.lm_head.to("meta")  # not quantized (default_filter), not needed for the statistics
    quantize_model(model, CONFIG, progress=False)
    quantize_model(plain, CONFIG, progress=False, calibration="none")
    lut, plain_lut = (m.model.layers[0].mlp.up_proj.weight.lut for m in (model, plain))
    assert not torch.equal(lut, plain_lut)
    before = lut.clone()
    quantize_model(model, CONFIG, progress=False)  # nothing left to quantize: no calibration, no error
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight.lut, before)


def test_uninitialized_lazy_linear_is_named():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.LazyLinear(32))
    with pytest.raises(LayerError, match=r"layer '2': weight is not initialized yet \(a lazy module\)"):
        quantize_model(model, CONFIG, progress=False, calibration="none")
    assert not isinstance(model[0].weight, Any4Tensor)


def test_a_copied_fixed_grid_model_is_recorded_as_its_grid_and_a_wrong_grid_label_is_refused(tmp_path):
    import copy as copy_module

    model = tiny_llama()
    nf4 = dataclasses.replace(CONFIG, codebook="nf4")
    quantize_model(model, nf4, progress=False)
    copy_module.deepcopy(model).save_pretrained(tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert saved["quant_type"]["default"]["_data"]["codebook"]["_data"] == "NF4"
    with pytest.raises(CheckpointError, match=r"the config says int4, but the LUT of '.*' is not that grid"):
        save_quantized(model, tmp_path / "q.safetensors", dataclasses.replace(CONFIG, codebook="int4"))
    assert not (tmp_path / "q.safetensors").exists()


class _TiedPair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(x))


@pytest.mark.parametrize("quantized_first", [False, True])
def test_load_quantized_keeps_tied_quantized_weights_tied(tmp_path, quantized_first):
    model = _TiedPair()
    quantize_model(model, CONFIG, progress=False, calibration="none")
    save_quantized(model, tmp_path / "t.safetensors")
    fresh = _TiedPair()
    if quantized_first:
        quantize_model(fresh, CONFIG, progress=False, calibration="none")
    load_quantized(tmp_path / "t.safetensors", fresh)
    assert fresh.a.weight is fresh.b.weight and len(list(fresh.parameters())) == 1
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("other", [dict(codebook="any2"), dict(group_size=64), dict(codebook="nf4")])
def test_quantize_model_of_a_quantized_model_with_another_layout_is_an_error(other):
    """It does not re-quantize; a config asking for another layout was silently ignored."""
    model = tiny_llama()
    quantize_model(model, CONFIG, progress=False, calibration="none")
    before = {n: p for n, p in model.named_parameters()}
    with pytest.raises(LayerError, match=r"layer 'model\.layers\.0\..*' is already quantized \(any4 at group 32\)"):
        quantize_model(model, dataclasses.replace(CONFIG, **other), progress=False, calibration="none")
    assert all(p is before[n] for n, p in model.named_parameters())


@pytest.mark.parametrize("calibration", ["none", "random-ids"])
def test_calibration_text_that_would_go_unused_is_an_error(calibration):
    from tiny_models import tiny_tokenizer

    model = tiny_llama()
    with pytest.raises(ValueError, match="calibration_text would be ignored"):
        quantize_model(
            model,
            CONFIG,
            progress=False,
            tokenizer=tiny_tokenizer("a b c"),
            calibration_text="a b",
            calibration=calibration,
        )
    assert not any(isinstance(p, Any4Tensor) for p in model.parameters())


# ----- second audit of 2026-12-07, numerics and ops (helper-12) -----
def test_messages_name_the_operation_not_a_checkpoint():
    q = Any4Tensor.from_hp(torch.randn(20, 100), group_size=32, kmeans_iterations=1)
    with pytest.raises(ValueError, match=r"cannot be sliced to an empty range of in_features \(\[32:32\] of dim 1"):
        q[:, 32:32]
    with pytest.raises(ValueError, match="cannot be converted to torch.float8_e4m3fn"):
        q.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="already an Any4Tensor"):
        Any4Tensor.from_hp(q)


def test_meta_input_on_a_meta_weight_gives_a_meta_result():
    q = Any4Tensor.from_hp(torch.randn(32, 128), group_size=64, kmeans_iterations=1).to("meta")
    out = F.linear(torch.randn(4, 128, device="meta"), q)
    assert out.device.type == "meta" and out.shape == (4, 32)


def test_an_embedding_selected_by_the_filter_is_refused_by_name():
    model = nn.Sequential(nn.Embedding(50, 64), nn.Linear(64, 64))
    with pytest.raises(LayerError, match=r"layer '0' is an Embedding: its forward looks rows up"):
        selected = lambda m, fqn: isinstance(m, (nn.Embedding, nn.Linear))  # noqa: E731
        quantize_model(model, CONFIG, filter_fn=selected, progress=False, calibration="none")
    assert not any(isinstance(p, Any4Tensor) for p in model.parameters())


def test_a_lut_dtype_other_than_the_weights_warns_at_quantization():
    model = nn.Sequential(nn.Linear(64, 64)).half()
    with pytest.warns(UserWarning, match=r"lut_dtype=torch.float32 differs from the weights' dtype \(torch.float16\)"):
        quantize_model(model, dataclasses.replace(CONFIG, lut_dtype=torch.float32), progress=False, calibration="none")


def test_the_raw_op_warns_when_weight_parts_ask_for_gradients():
    import any4ao.kernels.ops  # noqa: F401  (registers torch.ops.any4ao.*)

    t = Any4Tensor.from_hp(torch.randn(32, 64), group_size=32, kmeans_iterations=1)
    x = torch.randn(3, 64, requires_grad=True)
    lut = t.lut.clone().requires_grad_()
    with pytest.warns(UserWarning, match="gets no gradient"):
        y = torch.ops.any4ao.lut_linear(x, t.qdata, lut, t.scale, t.zero_point, 4, 32)
    y.sum().backward()
    assert x.grad is not None and lut.grad is None


def test_torchao_quantize_with_the_default_filter_names_the_layer_by_path():
    """torchao's quantize_ hands the handler a module only: with any4ao.default_filter the error still
    names the layer's path (it said 'Linear(in_features=64, out_features=64)', which fits many)."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[2, 3] = float("nan")
    with pytest.raises(LayerError, match=r"layer 'model\.layers\.1\.self_attn\.o_proj': weight has 1 NaN"):
        quantize_(model, CONFIG, filter_fn=any4ao.default_filter)


# ----- second hostile sweep (2026-12-07): cases an outside reader found -----
def test_load_into_a_model_with_another_methods_weight_fails_before_anything_changes(tmp_path):
    from torchao.quantization import Int8WeightOnlyConfig

    save_quantized(tiny_llama(seed=1), tmp_path / "float.safetensors")  # plain values for every weight
    model = tiny_llama(seed=2)
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn == "model.layers.1.mlp.down_proj")
    params = dict(model.named_parameters())
    embeddings = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(CheckpointError, match=r"float\.safetensors: 'model\.layers\.1\.mlp\.down_proj\.weight' is a"):
        load_quantized(tmp_path / "float.safetensors", model)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert torch.equal(model.model.embed_tokens.weight, embeddings)  # they were copied first, and stayed


def test_plain_values_that_overflow_the_models_dtype_are_refused(tmp_path):
    model = tiny_llama()
    quantize_model(model, CONFIG, progress=False, calibration="none")
    with torch.no_grad():
        model.model.norm.weight[3] = 1e6
    save_quantized(model, tmp_path / "big.safetensors")
    half = tiny_llama(seed=3).half()
    before = _snapshot(half)
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight': values up to 1e\+06 .* become Inf"):
        load_quantized(tmp_path / "big.safetensors", half)
    _assert_unchanged(half, before)


class _Pair(nn.Module):
    def __init__(self, tie):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False)
        if tie:
            self.b.weight = self.a.weight


def test_a_tied_file_into_an_untied_model_gives_each_parameter_its_own_parts(tmp_path):
    tied = _Pair(tie=True)
    quantize_model(tied, CONFIG, progress=False, calibration="none")
    save_quantized(tied, tmp_path / "t.safetensors")
    untied = _Pair(tie=False)
    load_quantized(tmp_path / "t.safetensors", untied)
    a, b = untied.a.weight, untied.b.weight
    assert torch.equal(a.dequantize(), b.dequantize())
    assert all(getattr(a, p).data_ptr() != getattr(b, p).data_ptr() for p in Any4Tensor.tensor_data_names)
    again = _Pair(tie=True)
    load_quantized(tmp_path / "t.safetensors", again)
    assert again.a.weight is again.b.weight  # a tied model stays tied


def test_unpickling_refuses_a_tensor_whose_dtype_is_not_its_parts():
    t = Any4Tensor.from_hp(torch.randn(16, 64), group_size=32, kmeans_iterations=1)
    for part in ("lut", "scale", "zero_point"):
        t.__dict__[part] = t.__dict__[part].bfloat16()
    buffer = io.BytesIO()
    torch.save({"w": t}, buffer)
    buffer.seek(0)
    with pytest.raises(InvalidAny4TensorError, match="says torch.float32, its parts are torch.bfloat16"):
        torch.load(buffer, weights_only=True)


def test_weights_made_under_inference_mode_quantize():
    with torch.inference_mode():
        model = tiny_llama()
        lone = nn.Linear(64, 32)
    quantize_model(model, CONFIG, progress=False)
    assert isinstance(model.model.layers[0].mlp.up_proj.weight, Any4Tensor)
    assert Any4Tensor.from_hp(lone.weight, CONFIG).shape == (32, 64)


def test_casts_refuse_only_scales_they_would_change_and_say_so_only_in_model_to(tmp_path):
    with pytest.warns(UserWarning, match="keep fewer bits"):  # fp16 weights ~1e-5: subnormal fp16 scales
        native = Any4Tensor.from_hp((torch.randn(8, 64) * 1e-5).half(), CONFIG)
    assert torch.equal(native.float().half().dequantize(), native.dequantize())  # lossless: allowed
    tiny = Any4Tensor.from_hp(torch.randn(8, 64) * 1e-7, CONFIG)
    with pytest.raises(ValueError, match=r"would change by up to .* %\. In model\.to\(\)"):
        tiny.half()
    with pytest.warns(UserWarning, match="group scales fall below torch.float16's normal range"):
        Any4Tensor.from_hp(torch.randn(8, 64) * 3e-7, CONFIG, codebook="int4", lut_dtype=torch.float16)
    model = nn.Sequential(nn.Linear(64, 8, bias=False))
    model[0].weight = nn.Parameter(tiny, requires_grad=False)
    save_quantized(model, tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError, match="would change by up to") as raised:  # all or nothing: no note
        load_quantized(tmp_path / "tiny.safetensors", nn.Sequential(nn.Linear(64, 8, bias=False)).half())
    assert "model.to()" not in str(raised.value)


def test_the_triton_ops_say_they_need_cuda(monkeypatch):
    from any4ao.kernels import ops

    monkeypatch.setattr(ops, "INTERPRET", False)
    t = Any4Tensor.from_hp(torch.randn(32, 64), group_size=32, kmeans_iterations=1)
    args = (t.qdata, t.lut, t.scale, t.zero_point, 4, 32)
    with pytest.raises(ValueError, match="lut_linear runs Triton kernels, on CUDA tensors"):
        ops.lut_linear(torch.randn(4, 64), *args, 64)
    with pytest.raises(ValueError, match="dequantize runs Triton kernels, on CUDA tensors"):
        ops.dequantize(*args, 64, torch.float32)


def _edit_whole_header(path, edit):
    header, body = _read_header(path)
    edit(header)
    _write_header(path, header, body)


def test_damaged_save_pretrained_files_name_the_file_and_what_is_missing(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    for case in ("entry", "part", "config"):
        hf = tmp_path / case
        shutil.copytree(saved[1] / "hf", hf)
        if case == "entry":
            _edit_whole_header(hf / "model.safetensors", lambda h: h["__metadata__"].pop(f"{LAYER}.weight"))
            match = rf"{hf}/model\.safetensors: no metadata entry for \['{LAYER}\.weight'\]"
        elif case == "part":
            rename = lambda h: h.__setitem__(f"{LAYER}._weight_lutx", h.pop(f"{LAYER}._weight_lut"))  # noqa: E731
            _edit_whole_header(hf / "model.safetensors", rename)
            match = r"cannot be rebuilt from the parts \['_weight_qdata', '_weight_scale', '_weight_zero_point'\]"
        else:  # config.json replaced by the base model's: the linears would load random
            config = json.loads((hf / "config.json").read_text())
            config.pop("quantization_config")
            (hf / "config.json").write_text(json.dumps(config))
            match = "holds any4-quantized weights, but the model's config.json has no quantization_config"
        with pytest.raises(ValueError, match=match):
            AutoModelForCausalLM.from_pretrained(hf)


def test_wrong_argument_types_are_named():
    import numpy as np

    model = tiny_llama()
    for config in ({"group_size": 32}, "any4"):
        with pytest.raises(TypeError, match="config must be an any4ao.Any4WeightOnlyConfig"):
            quantize_model(model, config)
    assert not any(isinstance(p, Any4Tensor) for p in model.parameters())
    quantize_model(model, CONFIG, filter_fn=None, progress=False, calibration="none")  # None: the default
    assert not isinstance(model.lm_head.weight, Any4Tensor)
    numpy_config = Any4WeightOnlyConfig(group_size=np.int64(64), gptq_damp=np.float32(0.05))
    assert type(numpy_config.group_size) is int and type(numpy_config.gptq_damp) is float
    with pytest.raises(TypeError, match="hessian must be a bool"):
        any4ao.calibrate(tiny_llama(), input_ids=IDS, hessian="no")
    with pytest.raises(TypeError, match="verify_checksums must be a bool"):
        load_quantized("unused.safetensors", verify_checksums="no")


def test_every_matmul_form_under_autocast_rounds_the_weight_once_as_f_linear_does():
    """Left to autocast, x @ W.t() rounded LUT, scale and zero point to bf16 and then the weight again:
    0.79 % max error against F.linear's 0.32 % on this problem."""
    torch.manual_seed(0)
    w = Any4Tensor.from_hp(torch.randn(64, 128), group_size=32)
    x, bias = torch.randn(8, 128), torch.randn(64).bfloat16()
    ref = x.double() @ w.dequantize(torch.float64).t()

    def err(y):
        assert y.dtype == torch.bfloat16
        return float((y.double() - ref).abs().max() / ref.abs().max())

    with torch.autocast("cpu", torch.bfloat16):
        once = err(F.linear(x, w))
        forms = {
            "x @ W.t()": x @ w.t(),
            "torch.matmul": torch.matmul(x, w.t()),
            "torch.mm": torch.mm(x, w.t()),
            "Tensor.mm": x.mm(w.t()),
            "W @ x.t()": (w @ x.t()).t(),
        }
        with_bias = torch.addmm(bias, x, w.t())
    for name, y in forms.items():
        assert err(y) <= 1.01 * once, name
    assert err(with_bias - bias) < 2 * once


# ----- third hostile sweep (2026-12-07): tensor, module and CLI paths -----
def test_share_memory_shares_the_packed_parts():
    model = nn.Sequential(nn.Linear(64, 32))
    quantize_model(model, CONFIG, progress=False, calibration="none")
    x = torch.randn(3, 64)
    before = model(x)
    model.share_memory()  # torch reached for the wrapper's storage, which it has not: a segfault
    w = model[0].weight
    assert w.is_shared() and all(getattr(w, p).is_shared() for p in Any4Tensor.tensor_data_names)
    assert torch.equal(model(x), before)


def _weight_and_input():
    torch.manual_seed(0)
    w = Any4Tensor.from_hp(torch.randn(48, 96), CONFIG)
    return w, w.dequantize(), torch.randn(5, 96)


def test_f_linear_fills_out_and_takes_keywords():
    w, dense, x = _weight_and_input()
    out = torch.zeros(5, 48)
    assert F.linear(x, w, out=out) is out  # out was left all zeros
    torch.testing.assert_close(out, x @ dense.T)
    want = x @ dense.T
    for y in (
        F.linear(x, weight=w),
        F.linear(input=x, weight=w, bias=None),
        torch.mm(x, mat2=w.t()),
        torch.matmul(input=x, other=w.t()),
        torch.addmm(input=torch.zeros(48), mat1=x, mat2=w.t()),
    ):
        torch.testing.assert_close(y, want)
    with pytest.raises(RuntimeError, match="out=.* don't support automatic differentiation"):
        F.linear(x.requires_grad_(), w, out=out)


def test_no_matmul_form_gives_the_quantized_weight_a_gradient():
    w, dense, x = _weight_and_input()
    p = nn.Parameter(w, requires_grad=True)
    x = x.requires_grad_()
    forms = [lambda: x @ p.T, lambda: (p @ x.T).T, lambda: torch.addmm(torch.zeros(48), x, p.T), lambda: F.linear(x, p)]
    for form in forms:
        with pytest.warns(UserWarning, match="gets no gradient"):
            y = form()
        y.sum().backward()
    assert p.grad is None  # a dense (48, 96) gradient was stored, which no optimizer step could apply
    torch.testing.assert_close(x.grad, 4 * torch.ones(5, 48) @ dense)
    torch.optim.SGD([p], lr=0.1).step()


def test_batched_and_transposed_forms_match_dense():
    w, dense, _ = _weight_and_input()
    x3 = torch.randn(4, 2, 96).transpose(0, 1)  # non-contiguous: matmul folded it into an expanding bmm
    torch.testing.assert_close(x3 @ w.T, x3 @ dense.T)
    b3 = torch.randn(3, 96, 7)
    torch.testing.assert_close(w @ b3, dense @ b3, rtol=1e-4, atol=1e-4)
    y3 = torch.randn(2, 3, 48)
    torch.testing.assert_close(y3 @ w, y3 @ dense, rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # F.linear(x, W.T) refused bf16 x under autocast
        y = F.linear(torch.randn(5, 48, dtype=torch.bfloat16), w.T)
    assert y.dtype == torch.bfloat16 and y.shape == (5, 96)


def test_quantize_model_again_with_another_config_is_an_error_and_mutated_configs_are_checked():
    model = tiny_llama()
    quantize_model(model, CONFIG, progress=False, calibration="none")
    quantize_model(model, CONFIG, progress=False, calibration="none")  # the same config: a no-op
    other = dataclasses.replace(CONFIG, lut_dtype=torch.bfloat16, kernel_preference="dequantize")
    with pytest.raises(LayerError, match="differs in lut_dtype, kernel_preference would be ignored"):
        quantize_model(model, other, progress=False, calibration="none")
    config = Any4WeightOnlyConfig(group_size=32)
    config.codebook = "nf4"  # assigned after construction: checked (and converted) when used
    lone = nn.Sequential(nn.Linear(64, 32))
    quantize_model(lone, config, progress=False, calibration="none")
    assert isinstance(lone[0].weight, Any4Tensor)
    config.codebook = "bogus"
    with pytest.raises(ValueError, match="codebook must be one of"):
        quantize_model(nn.Sequential(nn.Linear(64, 32)), config, progress=False, calibration="none")


def test_paired_bootstrap_resolves_nothing_on_fewer_than_six_windows():
    from any4ao.evaluation.stats import PairedBootstrap

    few = PairedBootstrap({"a": [1.0, 1.1, 1.2], "b": [2.0, 2.1, 2.2]}, [10, 10, 10])
    assert not few.compare("a", "b").resolved  # every resample of 3 agreeing windows agreed
    six = PairedBootstrap({"a": [1.0, 1.1, 1.2] * 2, "b": [2.0, 2.1, 2.2] * 2}, [10] * 6)
    assert six.compare("a", "b").resolved


# ----- fourth hostile sweep (2026-12-07): calibration and GPTQ inputs -----
class _SharedWeight(nn.Module):
    """One weight used by two layers on different inputs (a tied embedding / LM head, in small)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False)
        self.b.weight = self.a.weight

    def forward(self, xa, xb):
        return self.a(xa) + self.b(xb)


@pytest.mark.parametrize("gptq", [False, True])
def test_a_shared_weight_is_calibrated_on_every_sharers_inputs(gptq):
    from any4ao.calibration.activation_stats import record_channel_importance

    torch.manual_seed(0)
    xa, xb = torch.randn(256, 64), torch.randn(256, 64)
    xa[:, 32:] *= 1e-3  # a sees the first half of the channels, b the second
    xb[:, :32] *= 1e-3
    model = _SharedWeight()
    w = model.a.weight.detach().clone()
    with record_channel_importance(model, hessian=gptq) as stats:
        model(xa, xb)
    config = Any4WeightOnlyConfig(group_size=32, calibration=stats, error_feedback="gptq" if gptq else "none")
    quantize_model(model, config, progress=False)
    assert model.a.weight is model.b.weight

    def output_error(q):
        return sum(float((x @ (w - q).T).square().mean()) for x in (xa, xb))

    plain = Any4Tensor.from_hp(w, group_size=32).dequantize()
    # calibrated on a's inputs only, b's error was 2.1x plain any4's and the total 1.4x
    assert output_error(model.a.weight.dequantize()) <= output_error(plain)


def test_a_layer_that_saw_no_token_is_named_as_such():
    class Experts(nn.Module):  # an MoE whose second expert no token is routed to
        def __init__(self):
            super().__init__()
            self.emb, self.experts = nn.Embedding(50, 32), nn.ModuleList([nn.Linear(32, 32) for _ in range(2)])

        def get_input_embeddings(self):
            return self.emb

        def forward(self, ids, **kwargs):
            x = self.emb(ids)
            route = x[..., 0] > 100
            out = torch.zeros_like(x)
            out[~route], out[route] = self.experts[0](x[~route]), self.experts[1](x[route])
            return out

    with pytest.raises(LayerError, match=r"'experts\.1' has no calibration statistics: .* on no token"):
        quantize_model(Experts(), Any4WeightOnlyConfig(group_size=32), progress=False)


def test_from_hp_checks_its_calibration_and_hessian_arguments():
    torch.manual_seed(4)
    w, x = torch.randn(16, 96), torch.randn(20, 96) @ torch.randn(96, 96)
    name = "layer7.q_proj"
    bad = {
        "must be a torch.Tensor, got list": dict(channel_weight=[1.0] * 96),
        "must be real-valued, got torch.complex64": dict(channel_weight=torch.ones(96, dtype=torch.complex64)),
        "has no values": dict(channel_weight=torch.ones(96, device="meta")),
        "negative diagonal": dict(error_feedback="gptq", hessian=-torch.eye(96)),  # was taken as the identity
        "hessian must be real-valued": dict(error_feedback="gptq", hessian=torch.eye(96, dtype=torch.complex64)),
        "raise gptq_damp \\(now 1e-12\\)": dict(error_feedback="gptq", gptq_damp=1e-12, hessian=x.T @ x / 20),
    }
    for message, kwargs in bad.items():
        with pytest.raises(ValueError, match=rf"layer '{name}': .*{message}"):
            Any4Tensor.from_hp(w, group_size=32, name=name, **kwargs)


# ----- fifth sweep (2026-12-07): the documentation against behaviour -----
def test_w_times_a_vector_runs_on_the_quantized_weight():
    w, dense, _ = _weight_and_input()
    v = torch.randn(96)
    torch.testing.assert_close(w @ v, dense @ v)  # matmul took aten.mv, which an Any4Tensor lacks


def test_quantizing_a_tied_lm_head_alone_says_the_tie_ends(tmp_path):
    model = tiny_llama(tie=True)
    every_linear = lambda m, fqn: isinstance(m, nn.Linear)  # noqa: E731  (selects lm_head)
    with pytest.warns(
        UserWarning, match=r"'lm_head' shares its weight with model\.embed_tokens\.weight .* the tie ends"
    ):
        quantize_model(model, CONFIG, filter_fn=every_linear, progress=False, calibration="none")
    save_quantized(model, tmp_path / "q.safetensors")
    with pytest.raises(CheckpointError, match="LM head alone was quantized, which unties it"):
        load_quantized(tmp_path / "q.safetensors", tiny_llama(tie=True))


def test_torchao_quantize_of_a_tied_lm_head_says_the_tie_ends():
    """torchao's own filter selects every nn.Linear, so quantize_ of a tied model (GPT-2's only
    nn.Linear is its tied head) quietly untied it and kept both copies. Now said once, for the
    head only; an untied model, and a weight the user merely holds a reference to, say nothing."""
    from torchao.quantization import quantize_

    def shares_warnings(model, held=()):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quantize_(model, CONFIG)
        return [str(w.message) for w in caught if "shares its weight" in str(w.message)]

    (message,) = shares_warnings(tiny_llama(tie=True))
    assert message.startswith("quantize_: layer Linear(in_features=") and "the tie ends" in message
    assert "filter_fn=any4ao.default_filter" in message
    untied = tiny_llama(tie=False)
    held = [p for p in untied.parameters()]  # the user's own references (a list, as an optimizer keeps)
    assert shares_warnings(untied, held) == []
    model = tiny_llama(tie=True)
    every_linear = lambda m, fqn: isinstance(m, nn.Linear)  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:  # quantize_model warns by path, once
        warnings.simplefilter("always")
        quantize_model(model, CONFIG, filter_fn=every_linear, progress=False, calibration="none")
    assert [str(w.message)[:30] for w in caught if "shares its weight" in str(w.message)] == [
        "quantize_model: 'lm_head' shar"
    ]


# ----- sixth sweep (2026-12-08, helper): re-quantizing, ties, Hessians, CLI -----
def test_a_second_torchao_quantize_with_another_config_is_refused_not_ignored():
    """default_filter skipped quantized layers, so quantize_ with another config (nf4 at group 64 on
    an any4 g32 model) returned with the model unchanged and no word. Now the handler sees them: the
    same config is a no-op, another one an error naming the layer; quantize_model alike."""
    from torchao.quantization import quantize_

    model = tiny_llama()
    quantize_(model, CONFIG, filter_fn=any4ao.default_filter)
    before = {n: p.qdata.clone() for n, p in model.named_parameters() if isinstance(p, Any4Tensor)}
    quantize_(model, CONFIG, filter_fn=any4ao.default_filter)  # the same config: nothing to do
    other = dataclasses.replace(CONFIG, codebook="nf4", group_size=64)
    with pytest.raises(
        LayerError, match=r"'model\.layers\.0\.self_attn\.q_proj' is already quantized .* codebook, group_size"
    ):
        quantize_(model, other, filter_fn=any4ao.default_filter)
    with pytest.raises(LayerError, match="quantize_model does not re-quantize"):
        quantize_model(model, other, progress=False, calibration="none")
    after = {n: p.qdata for n, p in model.named_parameters() if isinstance(p, Any4Tensor)}
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_a_users_dict_of_the_parameters_is_not_a_tie():
    """The tie warning counted any dict holding the parameter: dict(model.named_parameters()) or
    state_dict(keep_vars=True) held by the user warned on every layer of an untied model."""
    from torchao.quantization import quantize_

    for hold in (lambda m: dict(m.named_parameters()), lambda m: m.state_dict(keep_vars=True)):
        model = tiny_llama(tie=False)
        held = hold(model)  # noqa: F841  (held while quantize_ runs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quantize_(model, CONFIG)
        assert not [w for w in caught if "shares its weight" in str(w.message)]


_EXTRA_DTYPES = [
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e8m0fnu", "uint16", "uint32", "uint64")
    if hasattr(torch, n)
] + [torch.complex64]


@pytest.mark.parametrize("dtype", _EXTRA_DTYPES, ids=str)
def test_every_dtype_save_quantized_writes_loads_back(dtype, tmp_path):
    """save_quantized wrote float8 / uint16-64 / complex64 tensors (a model's fp8 buffer) that
    load_quantized then refused as 'not a readable safetensors file', over a good checkpoint."""
    extra = torch.arange(6, dtype=torch.int64).reshape(2, 3).to(dtype)
    w, _, _ = _weight_and_input()
    save_quantized({"w": w, "extra": extra}, tmp_path / "q.safetensors")
    back = load_quantized(tmp_path / "q.safetensors")
    assert back["extra"].dtype == dtype and torch.equal(back["extra"].view(torch.uint8), extra.view(torch.uint8))


def test_a_dtype_the_loader_cannot_read_is_refused_before_writing(tmp_path):
    w, _, _ = _weight_and_input()
    path = tmp_path / "q.safetensors"
    save_quantized({"w": w}, path)
    good = path.read_bytes()
    with pytest.raises(CheckpointError, match=r"tensor 'extra' is torch\.complex128, which a \.safetensors"):
        save_quantized({"w": w, "extra": torch.zeros(2, dtype=torch.complex128)}, path)
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["q.safetensors"]


def test_an_op_the_tensor_lacks_says_what_it_is_and_what_to_do():
    """torchao's message named only the op and argument types: an optimizer step on a quantized weight
    (aten.add_) and a second torchao config (aten.amin) were unclear."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = tiny_llama()
    quantize_model(model, CONFIG, progress=False, calibration="none")
    w = model.model.layers[0].mlp.down_proj.weight
    w.requires_grad_(True)
    w.grad = torch.zeros(w.shape)
    with pytest.raises(NotImplementedError, match=r"aten\.add_\.Tensor is not implemented for an Any4Tensor .*frozen"):
        torch.optim.SGD([w], lr=0.1).step()
    with pytest.raises(NotImplementedError, match=r"aten\.amin\.default .* another torchao config.*dequantize"):
        quantize_(model, Int8WeightOnlyConfig())


# ----- review of this session's changes (2026-12-07): regressions they had introduced -----
def test_a_save_quantized_file_beside_a_float_checkpoint_does_not_fail_its_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path)
    model = tiny_llama(seed=1)
    quantize_model(model, CONFIG, progress=False, calibration="none")
    save_quantized(model, tmp_path / "any4.safetensors")  # not one of the checkpoint's files
    assert not any(isinstance(p, Any4Tensor) for p in AutoModelForCausalLM.from_pretrained(tmp_path).parameters())


META_OPS = """
import torch, any4ao, any4ao.kernels.ops
w = any4ao.Any4Tensor.from_hp(torch.randn(32, 128).half(), group_size=32, kmeans_iterations=1)
parts = [p.to("meta") for p in (w.qdata, w.lut, w.scale, w.zero_point)]
x = torch.randn(4, 128, dtype=torch.float16, device="meta", requires_grad=True)
torch.ops.any4ao.lut_linear(x, *parts, 4, 32).sum().backward()  # backward dequantizes, on meta
assert x.grad.shape == (4, 128) and x.grad.device.type == "meta"
print("ok")
"""


def test_meta_tensors_run_the_ops_shape_inference_forward_and_backward():
    """Shape inference on meta tensors (memory / FLOP estimates): without the Triton interpreter, which
    the test session runs under and which cannot read meta tensors, so in a fresh process."""
    from helpers import run_in_fresh_process

    run_in_fresh_process(META_OPS, unset=("TRITON_INTERPRET",))


def test_review_regressions_in_quantize_model_and_loading(tmp_path):
    with pytest.raises(LayerError, match="layer '1' has no parameter 'weight'"):  # was a bare AttributeError
        quantize_model(nn.Sequential(nn.Linear(64, 32), nn.ReLU()), CONFIG, filter_fn=lambda m, f: f in ("0", "1"))
    model = nn.Sequential(nn.Linear(64, 32))
    quantize_model(model, CONFIG, progress=False, calibration="none")
    quantize_model(model, dataclasses.replace(CONFIG, lut_dtype=torch.float32), progress=False, calibration="none")
    plain = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 32))
    quantize_model(plain, CONFIG, progress=False, calibration="none")
    with torch.no_grad():
        plain[0].weight[0] = 65510.0  # rounds to fp16's 65504, as load_state_dict would store it
    save_quantized(plain, tmp_path / "edge.safetensors")
    half = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 32)).half()
    load_quantized(tmp_path / "edge.safetensors", half)
    assert float(half[0].weight[0]) == 65504.0


def test_torch_load_with_a_dict_map_location_says_what_to_pass_instead():
    w = Any4Tensor.from_hp(torch.randn(32, 128), CONFIG)
    buffer = io.BytesIO()
    torch.save({"w": w}, buffer)
    buffer.seek(0)
    with pytest.raises(InvalidAny4TensorError, match="map_location as a dict .* pass map_location as a device"):
        torch.load(buffer, map_location={"cpu": "meta"}, weights_only=True)  # parts moved, the wrapper not


# --- tensor-subclass operations on a quantized weight (fifth audit) ---


def test_copy_into_a_slice_along_in_features_keeps_the_columns_outside_it():
    """w[:, :32].copy_(v[:, :32]) also copied v's per-row LUTs, which the columns outside the slice
    share: w[:, 32:] changed silently. Refused unless the LUTs are equal (fixed grids); row slices
    and clones of a slice copy as before."""
    torch.manual_seed(0)
    w, v = (Any4Tensor.from_hp(torch.randn(16, 96) * s, CONFIG) for s in (1, 5))
    before = w.dequantize()
    with pytest.raises(ValueError, match="slice along in_features .* shares each row's LUT"):
        w[:, :32].copy_(v[:, :32])
    with pytest.raises(ValueError, match="slice along in_features"):
        w.t()[32:64].copy_(v.t()[32:64])
    assert torch.equal(w.dequantize(), before)
    w[:8].copy_(v[:8])  # whole rows: their LUTs go with them
    assert torch.equal(w.dequantize()[:8], v.dequantize()[:8]) and torch.equal(w.dequantize()[8:], before[8:])
    part = w[:, :32].clone()
    part.copy_(v[:, :32])
    assert torch.equal(part.dequantize(), v.dequantize()[:, :32])
    a, b = (Any4Tensor.from_hp(torch.randn(16, 96), CONFIG, codebook="int4") for _ in range(2))
    dense_a = a.dequantize()
    a[:, 32:64].copy_(b[:, 32:64])  # one grid for every row: the slice copies alone
    assert torch.equal(a.dequantize()[:, 32:64], b.dequantize()[:, 32:64])
    assert torch.equal(a.dequantize()[:, :32], dense_a[:, :32]) and torch.equal(a.dequantize()[:, 64:], dense_a[:, 64:])


def test_to_with_copy_true_does_not_alias_the_source():
    """.to(same dtype and device, copy=True) returned the source's own parts: a copy_ into the
    "copy" changed the original."""
    torch.manual_seed(0)
    w, v = (Any4Tensor.from_hp(torch.randn(16, 96), CONFIG) for _ in range(2))
    before = w.dequantize()
    for copied in (w.to(torch.float32, copy=True), w.to("cpu", copy=True)):
        assert torch.equal(copied.dequantize(), before)
        copied.copy_(v)
        assert torch.equal(w.dequantize(), before)
    assert w.to(torch.float32) is w  # no copy asked for: the tensor itself, as torch


def test_out_of_range_dims_and_split_sizes_are_refused_as_torch_refuses_them():
    """Dims were taken modulo 2: split(16, dim=2) split the rows, transpose(0, 2) and permute(2, 3)
    did nothing and permute(1, 2) transposed; split(-1) returned no block."""
    w = Any4Tensor.from_hp(torch.randn(48, 96), CONFIG)
    calls = [
        lambda: w.split(16, dim=2),
        lambda: w.split(32, dim=-3),
        lambda: w.transpose(0, 2),
        lambda: w.swapaxes(1, 3),
        lambda: w.permute(1, 2),
        lambda: w.permute(2, 3),
        lambda: torch.ops.aten.slice.Tensor(w, 2, 0, 4),
    ]
    for call in calls:
        with pytest.raises(IndexError, match="Dimension out of range"):
            call()
    for size in (-1, 0):
        with pytest.raises(RuntimeError, match="positive split_size"):
            w.split(size)
    assert [p.shape for p in w[:0].split(16)] == [(0, 96)]  # as torch: one empty block
    assert torch.equal(w.transpose(0, -1).dequantize(), w.dequantize().T)
    with pytest.raises(NotImplementedError, match=r"view\(-1,\) of shape \(96, 48\), transposed"):
        w.t().view(-1)
