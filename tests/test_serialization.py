"""Saving and loading quantized models: safetensors, transformers save/from_pretrained, bad files."""

import json
import struct

import pytest
import torch
from helpers import run_in_fresh_process
from tiny_models import tiny_llama
from transformers import AutoModelForCausalLM, TorchAoConfig

import any4ao
from any4ao import Any4Tensor, Any4WeightOnlyConfig, LayerError, load_quantized, quantize_model, save_quantized
from any4ao.validation import ChecksumError, InvalidAny4TensorError

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))


def _quantized(codebook="any4", seed=0):
    model = tiny_llama(seed=seed)
    quantize_model(model, Any4WeightOnlyConfig(codebook=codebook, group_size=32, kmeans_iterations=5), progress=False)
    return model


@torch.no_grad()
def _logits(model):
    return model(IDS).logits


@pytest.mark.parametrize("codebook", ["any4", "any3", "nf4"])
def test_safetensors_round_trip_into_an_unquantized_model(tmp_path, codebook):
    model = _quantized(codebook)
    path = tmp_path / "q.safetensors"
    save_quantized(model, path, Any4WeightOnlyConfig(codebook=codebook, group_size=32))
    fresh = tiny_llama(seed=1)  # different random weights: everything must come from the file
    state = load_quantized(path, fresh)
    assert isinstance(fresh.model.layers[0].mlp.down_proj.weight, Any4Tensor)
    assert isinstance(state["model.layers.1.self_attn.q_proj.weight"], Any4Tensor)
    assert torch.equal(_logits(fresh), _logits(model))


def test_files_from_compiled_and_eager_models_are_the_same(tmp_path):
    """The README compiles, then saves: the file held torch.compile's _orig_mod. prefix on every key
    and did not load into an eager model."""
    model = _quantized()
    save_quantized(torch.compile(model), tmp_path / "compiled.safetensors")
    save_quantized(model, tmp_path / "eager.safetensors")
    compiled_keys, eager_keys = (
        set(load_quantized(tmp_path / f)) for f in ("compiled.safetensors", "eager.safetensors")
    )
    assert compiled_keys == eager_keys and not any(k.startswith("_orig_mod.") for k in compiled_keys)
    eager, wrapped = tiny_llama(seed=1), torch.compile(tiny_llama(seed=2))  # the wrapper compiles on first call only
    load_quantized(tmp_path / "compiled.safetensors", eager)
    load_quantized(tmp_path / "eager.safetensors", wrapped)
    assert torch.equal(_logits(eager), _logits(model))
    assert torch.equal(_logits(wrapped._orig_mod), _logits(model))


def test_saved_metadata_names_format_and_config(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "q.safetensors"
    save_quantized(_quantized(), path, Any4WeightOnlyConfig(group_size=32, calibration=None))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["any4ao_format"] == "3" and meta["any4ao_checksum_algorithm"] == "xxh3_64+layout"
    assert json.loads(meta["any4ao_config"])["_data"]["group_size"] == 32
    parts = {f"model.layers.0.mlp.up_proj._weight_{p}" for p in ("qdata", "lut", "scale", "zero_point")}
    assert parts <= keys and "lm_head.weight" in keys


def test_a_config_that_does_not_describe_the_weights_is_not_stored(tmp_path):
    path = tmp_path / "q.safetensors"
    for wrong in (
        Any4WeightOnlyConfig(codebook="int4", group_size=128),
        Any4WeightOnlyConfig(codebook="any3", group_size=32),
    ):
        with pytest.raises(ValueError, match="but 'model.layers.0.self_attn.q_proj.weight' is 4-bit at group 32"):
            save_quantized(_quantized(), path, wrong)
    assert not path.exists()


def test_truncated_file_is_rejected(tmp_path):
    path = tmp_path / "q.safetensors"
    save_quantized(_quantized(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_quantized(path)


def _rewrite_metadata(path, edit):
    """Rewrite a safetensors file's JSON header through `edit(header_dict)`."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_tampered_shape_metadata_is_rejected(tmp_path):
    path = tmp_path / "q.safetensors"
    save_quantized(_quantized(), path)

    def edit(header):
        meta = json.loads(header["__metadata__"]["model.layers.0.mlp.up_proj.weight"])
        meta["_data"]["shape"] = [160, 128]  # claims twice the input features the codes hold
        header["__metadata__"]["model.layers.0.mlp.up_proj.weight"] = json.dumps(meta)

    _rewrite_metadata(path, edit)
    with pytest.raises(ChecksumError, match=r"q\.safetensors.*metadata of 'model\.layers\.0\.mlp\.up_proj\.weight'"):
        load_quantized(path)
    with pytest.raises(InvalidAny4TensorError, match=r"up_proj\.weight.*qdata has shape"):
        load_quantized(path, verify_checksums=False)


def test_missing_part_and_foreign_files_are_rejected(tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "q.safetensors"
    save_quantized(_quantized(), path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    del tensors["model.layers.1.self_attn.k_proj._weight_lut"]
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="parts missing.*k_proj"):
        load_quantized(path)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not written by any4ao"):
        load_quantized(plain)
    with pytest.raises(FileNotFoundError):
        load_quantized(tmp_path / "nope.safetensors")


def test_mismatched_model_is_rejected_and_left_untouched(tmp_path):
    path = tmp_path / "q.safetensors"
    save_quantized(_quantized(), path)
    other = tiny_llama(hidden=96, intermediate=160)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="has shape"):
        load_quantized(path, other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    assert not any(isinstance(p, Any4Tensor) for p in other.parameters())


def test_transformers_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "fp32")
    config = TorchAoConfig(quant_type=Any4WeightOnlyConfig(group_size=32, kmeans_iterations=5))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=config, dtype=torch.float32)
    assert isinstance(model.model.layers[0].self_attn.q_proj.weight, Any4Tensor)
    assert not isinstance(model.lm_head.weight, Any4Tensor)  # transformers keeps the head in high precision
    model.save_pretrained(tmp_path / "any4")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "any4", dtype=torch.float32)
    assert isinstance(reloaded.model.layers[1].mlp.gate_proj.weight, Any4Tensor)
    assert not any(p.requires_grad for p in reloaded.parameters() if isinstance(p, Any4Tensor))  # frozen
    assert torch.equal(_logits(reloaded), _logits(model))
    saved = json.loads((tmp_path / "any4" / "config.json").read_text())["quantization_config"]
    assert saved["quant_type"]["default"]["_type"] == "Any4WeightOnlyConfig"
    # a loaded checkpoint saves again: transformers asked its rebuild-from-parts step for an inverse it
    # lacks, after config.json was written (a directory that claimed weights it did not hold)
    reloaded.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32)
    assert torch.equal(_logits(again), _logits(model))
    assert reloaded._weight_conversions  # the loaded model's own record is back after the save


def test_quantize_on_load_refuses_a_calibration_recorded_on_another_model(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "fp32")
    stats = any4ao.calibrate(model, input_ids=IDS)
    config = TorchAoConfig(quant_type=Any4WeightOnlyConfig(group_size=32, calibration=stats))
    with pytest.raises(ValueError, match="belong to the model they were recorded on"):  # was a JSON TypeError
        AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=config)


def test_save_pretrained_records_a_copied_models_layout_and_each_layers_own_when_they_differ(tmp_path):
    import copy

    model = tiny_llama()
    quantize_model(model, Any4WeightOnlyConfig(group_size=32, kmeans_iterations=2, kernel_preference="dequantize"))
    copy.deepcopy(model).save_pretrained(tmp_path / "copy")  # no record of the config: read off the tensors
    saved = json.loads((tmp_path / "copy" / "config.json").read_text())["quantization_config"]
    assert saved["quant_type"]["default"]["_data"]["kernel_preference"]["_data"] == "DEQUANTIZE"
    mixed = tiny_llama()
    quantize_model(
        mixed,
        Any4WeightOnlyConfig(group_size=64, kmeans_iterations=2),
        filter_fn=lambda m, n: "mlp" in n and isinstance(m, torch.nn.Linear),
    )
    quantize_model(mixed, Any4WeightOnlyConfig(codebook="any3", group_size=32, kmeans_iterations=2))
    mixed.save_pretrained(tmp_path / "mixed")
    saved = json.loads((tmp_path / "mixed" / "config.json").read_text())["quantization_config"]["quant_type"]
    per_layer = saved["default"]["_data"]["fqn_to_config"]  # torchao's FqnToConfig: each layer its own
    layouts = {n: (c["_data"]["codebook"]["_data"], c["_data"]["group_size"]) for n, c in per_layer.items()}
    assert layouts["model.layers.0.mlp.down_proj"] == ("ANY4", 64)
    assert layouts["model.layers.1.self_attn.q_proj"] == ("ANY3", 32)
    assert len(layouts) == sum(isinstance(p, Any4Tensor) for p in mixed.parameters())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "mixed", dtype=torch.float32)
    assert torch.equal(_logits(reloaded), _logits(mixed))  # every weight as stored
    reloaded.save_pretrained(tmp_path / "again")  # a reloaded mixed model saves again, as it was
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32)
    assert torch.equal(_logits(again), _logits(mixed))


def test_quantize_on_load_with_an_fqn_to_config_and_its_round_trip(tmp_path):
    from collections import OrderedDict

    from torchao.quantization import FqnToConfig

    tiny_llama().save_pretrained(tmp_path / "float")
    per_layer = FqnToConfig(
        OrderedDict(
            [
                ("re:.*mlp.*", Any4WeightOnlyConfig(group_size=32, kmeans_iterations=2)),
                ("re:.*self_attn.*", Any4WeightOnlyConfig(codebook="nf4", group_size=64)),
            ]
        )
    )
    q = AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", quantization_config=TorchAoConfig(quant_type=per_layer), dtype=torch.float32
    )
    groups = {n.split(".")[-2]: p.group_size for n, p in q.named_parameters() if isinstance(p, Any4Tensor)}
    assert groups == {
        "q_proj": 64,
        "k_proj": 64,
        "v_proj": 64,
        "o_proj": 64,
        "gate_proj": 32,
        "up_proj": 32,
        "down_proj": 32,
    }
    q.save_pretrained(tmp_path / "q")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)), _logits(q))


def test_registration_is_idempotent():
    any4ao.register_with_torchao()
    any4ao.register_with_transformers()
    import torchao.prototype.safetensors.safetensors_utils as su

    assert su.ALLOWED_TENSORS_SUBCLASSES.count("Any4Tensor") == 1


LAZY_REGISTRATION = """
import sys
sys.path.insert(0, {tests!r})
import torch
import any4ao
from any4ao.integrations import transformers_loading
assert "transformers" not in sys.modules, "import any4ao must not import transformers"
assert not transformers_loading._registered
from transformers import AutoModelForCausalLM, TorchAoConfig
from tiny_models import tiny_llama
tiny_llama().save_pretrained({path!r} + "/fp32")
config = TorchAoConfig(quant_type=any4ao.Any4WeightOnlyConfig(group_size=32, kmeans_iterations=5))
model = AutoModelForCausalLM.from_pretrained({path!r} + "/fp32", quantization_config=config, dtype=torch.float32)
model.save_pretrained({path!r} + "/any4")
reloaded = AutoModelForCausalLM.from_pretrained({path!r} + "/any4", dtype=torch.float32)
assert isinstance(reloaded.model.layers[1].mlp.gate_proj.weight, any4ao.Any4Tensor)
ids = torch.arange(12).reshape(1, 12)
assert torch.equal(reloaded(ids).logits, model(ids).logits)
assert transformers_loading._registered  # done when transformers' models loaded
print("ok")
"""


def test_import_defers_transformers_and_registers_when_it_loads(tmp_path):
    """A fresh process: `import any4ao` leaves transformers unloaded (it costs ~1.5 s to import), and
    the torchao quantizer is still extended when transformers loads, so the round trip works."""
    from pathlib import Path

    run_in_fresh_process(LAZY_REGISTRATION.format(tests=str(Path(__file__).parent), path=str(tmp_path)))


FIRST_LOAD = """
import sys, torch
import any4ao
from transformers import AutoModelForCausalLM
assert "transformers.modeling_utils" not in sys.modules or any4ao.integrations.transformers_loading._registered
path, case = {path!r}, {case!r}
if case == "dtype":
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    w = model.model.layers[0].mlp.up_proj.weight
    assert isinstance(w, any4ao.Any4Tensor) and w.dtype == torch.bfloat16 and not w.requires_grad, (w.dtype, w.requires_grad)
else:
    try:
        AutoModelForCausalLM.from_pretrained(path)
    except any4ao.ChecksumError as e:
        assert "is corrupt" in str(e)
    else:
        raise AssertionError("a corrupt checkpoint loaded")
print("ok")
"""


@pytest.mark.parametrize("case", ["dtype", "corrupt"])
def test_the_first_from_pretrained_in_a_process_is_checked_and_cast(tmp_path, case):
    """Registration used to happen inside the first from_pretrained (when the checkpoint's config
    built an Any4WeightOnlyConfig), too late for that call: its dtype= left the Any4Tensors fp32
    (the first forward failed) and a corrupt file gave transformers' generic RuntimeError. Now
    `import any4ao` registers as soon as transformers' models load."""
    model = _quantized()
    model.save_pretrained(tmp_path / "hf")
    if case == "corrupt":
        path = tmp_path / "hf" / "model.safetensors"
        data = bytearray(path.read_bytes())
        (n,) = struct.unpack("<Q", data[:8])
        start = json.loads(data[8 : 8 + n])["model.layers.0.mlp.up_proj._weight_qdata"]["data_offsets"][0]
        data[8 + n + start] ^= 0x10
        path.write_bytes(bytes(data))
    run_in_fresh_process(FIRST_LOAD.format(path=str(tmp_path / "hf"), case=case))


def test_quantize_on_load_errors_name_the_layer(tmp_path):
    """A float checkpoint quantized by from_pretrained: our LayerError comes out, not transformers'
    generic RuntimeError with the cause only in its logged load report."""
    model = tiny_llama(layers=1)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "float")
    config = TorchAoConfig(quant_type=Any4WeightOnlyConfig(group_size=32, kmeans_iterations=1))
    with pytest.raises(LayerError, match=r"layer 'model\.layers\.0\.mlp\.up_proj': weight has 1 NaN"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=config, dtype=torch.float32)


def test_save_pretrained_refuses_embeddings_configured_untied_but_still_shared(tmp_path):
    """untie_embedding_weights=True with a tied model whose embeddings stay float: transformers
    leaves lm_head and embed_tokens one parameter under tie_word_embeddings=False, and the round trip
    came back with a random lm_head. Untied as the message says, it round-trips."""
    tiny_llama(tie=True).save_pretrained(tmp_path / "tied")
    config = TorchAoConfig(
        quant_type=Any4WeightOnlyConfig(group_size=32, kmeans_iterations=1),
        include_input_output_embeddings=True,
        untie_embedding_weights=True,
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tied", quantization_config=config, dtype=torch.float32)
    with pytest.raises(ValueError, match="tie_word_embeddings=False .* still one parameter"):
        model.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q" / "model.safetensors").exists()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_from_pretrained_with_a_dtype_casts_the_quantized_weights_too(tmp_path):
    """An fp32 any4 checkpoint loaded with dtype=bfloat16: transformers casts the plain weights,
    and the Any4Tensors follow (they kept fp32 before, and the first forward failed); the logits
    stay those of the fp32 model within bf16 rounding. A cast that cannot be made (scales below
    fp16's range) names the weight."""
    tiny_llama().save_pretrained(tmp_path / "fp32")
    config = TorchAoConfig(quant_type=Any4WeightOnlyConfig(group_size=32, kmeans_iterations=5))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=config, dtype=torch.float32)
    model.save_pretrained(tmp_path / "any4")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    for dtype in (torch.bfloat16, "bfloat16", {"": torch.bfloat16}):
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "any4", dtype=dtype)
        weights = [m.weight for m in reloaded.modules() if isinstance(getattr(m, "weight", None), Any4Tensor)]
        assert weights and all(w.dtype == torch.bfloat16 and w.scale.dtype == torch.bfloat16 for w in weights)
        with torch.no_grad():
            ref, got = model(ids).logits, reloaded(ids).logits.float()
        assert ((got - ref).norm() / ref.norm()).item() < 3e-2

    tiny = tiny_llama()
    with torch.no_grad():
        tiny.model.layers[0].mlp.up_proj.weight.mul_(1e-9)  # scales ~1e-10: no fp16 value holds them
    tiny.save_pretrained(tmp_path / "tiny-fp32")
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "tiny-fp32", quantization_config=config, dtype=torch.float32
    )
    model.save_pretrained(tmp_path / "tiny-any4")
    with pytest.raises(ValueError, match=r"up_proj.weight.*cannot be cast to torch.float16"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-any4", dtype=torch.float16)


def test_load_quantized_refuses_a_device_that_is_no_device(tmp_path):
    path = tmp_path / "q.safetensors"
    save_quantized(_quantized(), path)
    with pytest.raises(TypeError, match="device must be a str or torch.device"):
        load_quantized(path, device=torch.float16)


# ----- _read with several threads (ANY4AO_LOAD_THREADS): the same tensors, checksums and errors -----


def _several_tensors(path):
    """A checkpoint of tensors of several dtypes and sizes (one over several 256 KiB read pieces, one
    empty, one Any4Tensor), saved to `path`."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (64, 128), dtype=torch.uint8, generator=g)
    lut = torch.randn(64, 16, generator=g).sort(1).values.bfloat16()
    scale = (torch.rand(64, 4, generator=g) + 0.01).bfloat16()
    zero = torch.randn(64, 4, generator=g).bfloat16()
    state = {
        "big": torch.randn(200_000, generator=g),  # 800 kB: four pieces
        "half": torch.randn(3000, generator=g).half(),
        "ints": torch.randint(-9, 9, (17, 5), dtype=torch.int64, generator=g),
        "mask": torch.rand(333, generator=g) > 0.5,
        "empty": torch.empty(0, 4),
        "q.weight": Any4Tensor.from_codes(codes, lut, scale, zero, 4, 32),
    }
    save_quantized(state, path)


def _bits(t):
    return t.reshape(-1).view(torch.uint8)


def test_threaded_read_gives_the_serial_tensors_order_and_checksums(tmp_path, monkeypatch):
    import threading

    from any4ao import serialization

    path = tmp_path / "q.safetensors"
    _several_tensors(path)
    monkeypatch.setenv("ANY4AO_LOAD_THREADS", "1")
    serial, meta, serial_sums = serialization._read(path, hash_tensors=True)
    hashed_on, real_hasher = [], serialization.tensor_hasher

    def hasher(*args):
        hashed_on.append(threading.current_thread().name)
        return real_hasher(*args)

    monkeypatch.setattr(serialization, "tensor_hasher", hasher)
    monkeypatch.setenv("ANY4AO_LOAD_THREADS", "3")
    threaded, threaded_meta, threaded_sums = serialization._read(path, hash_tensors=True)
    # pool threads did the reading, not the calling thread (how many: a thread done with its shard may
    # take the next one before the pool starts a third, as it did every run on the 2-core machine)
    assert hashed_on and all(name.startswith("any4ao-load") for name in hashed_on)
    assert list(threaded) == list(serial) and list(threaded_sums) == list(serial_sums)  # file order
    assert threaded_sums == serial_sums and threaded_meta == meta
    for key, t in serial.items():
        assert threaded[key].dtype == t.dtype and threaded[key].shape == t.shape
        assert torch.equal(_bits(threaded[key]), _bits(t)), key
    loaded = load_quantized(path)  # the checksums verify (threads still 3)
    assert torch.equal(_bits(loaded["big"]), _bits(serial["big"]))
    assert torch.equal(loaded["q.weight"].qdata, serial["q._weight_qdata"])


def test_a_file_cut_short_fails_the_same_with_threads(tmp_path, monkeypatch):
    import os

    from any4ao import serialization

    path = tmp_path / "q.safetensors"
    _several_tensors(path)
    data = path.read_bytes()
    real_workers = serialization._read_workers

    def cut_after_the_header_check(total):  # the file shrinks while it loads: a worker's short read
        os.truncate(path, len(data) - 100)
        return real_workers(total)

    monkeypatch.setattr(serialization, "_read_workers", cut_after_the_header_check)
    errors = {}
    for threads in ("1", "3"):
        monkeypatch.setenv("ANY4AO_LOAD_THREADS", threads)
        path.write_bytes(data)
        with pytest.raises(ValueError, match="short read") as e:
            load_quantized(path)
        errors[threads] = str(e.value)
    assert errors["1"] == errors["3"]
    monkeypatch.setattr(serialization, "_read_workers", real_workers)
    for threads in ("1", "3"):  # cut before the load: the header check, on the calling thread
        monkeypatch.setenv("ANY4AO_LOAD_THREADS", threads)
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match="truncated") as e:
            load_quantized(path)
        errors[threads] = str(e.value)
    assert errors["1"] == errors["3"]


def test_a_file_replaced_while_threads_load_it_is_refused(tmp_path, monkeypatch):
    """The serial read keeps reading the file whose header it checked (one handle); each thread opens
    the path again, so it must find that same file, not one save_quantized renamed over it since."""
    import os

    from any4ao import serialization

    path, other = tmp_path / "q.safetensors", tmp_path / "other.safetensors"
    _several_tensors(path)
    real_workers = serialization._read_workers

    def replace_after_the_header_check(total):
        other.write_bytes(path.read_bytes())
        os.replace(other, path)
        return real_workers(total)

    monkeypatch.setattr(serialization, "_read_workers", replace_after_the_header_check)
    monkeypatch.setenv("ANY4AO_LOAD_THREADS", "1")
    load_quantized(path)  # the old file, through the handle that read its header
    monkeypatch.setenv("ANY4AO_LOAD_THREADS", "3")
    with pytest.raises(ValueError, match="q.safetensors: not a readable .* replaced while loading"):
        load_quantized(path)


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5", ""])
def test_a_bad_load_threads_value_is_refused_by_name(tmp_path, monkeypatch, value):
    path = tmp_path / "q.safetensors"
    _several_tensors(path)
    monkeypatch.setenv("ANY4AO_LOAD_THREADS", value)
    with pytest.raises(ValueError, match=f"ANY4AO_LOAD_THREADS={value!r}: expected an integer >= 1"):
        load_quantized(path)


def test_read_threads_follow_cores_and_size_and_shards_balance_bytes(monkeypatch):
    from any4ao import serialization

    monkeypatch.delenv("ANY4AO_LOAD_THREADS", raising=False)
    mib = 1 << 20
    for cores, total, expected in [(2, 1 << 30, 1), (3, 1 << 30, 1), (16, 15 * mib, 1), (16, 16 * mib, 8)]:
        monkeypatch.setattr(serialization.os, "sched_getaffinity", lambda pid, c=cores: set(range(c)), raising=False)
        assert serialization._read_workers(total) == expected, (cores, total)
    monkeypatch.setattr(serialization.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert serialization._read_workers(1 << 30) == 8
    monkeypatch.setattr(serialization.os, "sched_getaffinity", lambda pid: {0, 5, 6, 7, 9, 11}, raising=False)
    assert serialization._read_workers(1 << 30) == 3
    monkeypatch.setenv("ANY4AO_LOAD_THREADS", "5")
    assert serialization._read_workers(10) == 5  # the override bypasses the size floor
    # one large tensor and many small ones: the large one is a shard alone, the small ones share the rest
    sizes = [10, 10, 100, 10, 10, 10, 10]
    entries, start = [], 0
    for i, size in enumerate(sizes):
        entries.append((start, start + size, f"t{i}", torch.uint8, [size]))
        start += size
    shards = serialization._shards(entries, 3)
    assert sorted(sum(e[1] - e[0] for e in s) for s in shards) == [30, 30, 100]
    assert all(s == sorted(s) for s in shards) and sorted(e for s in shards for e in s) == entries


def test_load_threads_are_capped_whatever_the_variable_says(tmp_path, monkeypatch):
    """ANY4AO_LOAD_THREADS=1000000000 on a file of many tensors started one thread (and one file
    handle) per tensor: out of handles (EMFILE) where the serial read loads."""
    from any4ao import serialization

    path = tmp_path / "q.safetensors"
    save_quantized({f"t{i}": torch.full((3,), float(i)) for i in range(100)}, path)
    shard_counts, real_shards = [], serialization._shards

    def shards(entries, workers):
        shard_counts.append(workers)
        return real_shards(entries, workers)

    monkeypatch.setattr(serialization, "_shards", shards)
    monkeypatch.setenv("ANY4AO_LOAD_THREADS", str(10**9))
    loaded = load_quantized(path)
    assert shard_counts == [64] and all(float(loaded[f"t{i}"][0]) == i for i in range(100))
    assert serialization._read_workers(1 << 30) == serialization.MAX_LOAD_THREADS == 64


@pytest.mark.parametrize("threads", ["1", "3"])
def test_a_load_under_another_default_device_reads_into_cpu_memory(tmp_path, monkeypatch, threads):
    """The default device is thread-local: the worker threads never saw the caller's, and the serial
    read made its buffers there (meta or cuda) and failed in numpy() without naming the file."""
    path = tmp_path / "q.safetensors"
    _several_tensors(path)
    monkeypatch.setenv("ANY4AO_LOAD_THREADS", threads)
    expected = load_quantized(path)
    with torch.device("meta"):
        loaded = load_quantized(path)
    assert loaded["big"].device.type == "cpu" and loaded["q.weight"].qdata.device.type == "cpu"
    assert torch.equal(_bits(loaded["big"]), _bits(expected["big"]))
