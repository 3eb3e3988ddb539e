import copy
import io

import pytest
import torch
from tiny_models import tiny_llama
from torch import nn
from torchao.quantization import quantize_

import any4ao
from any4ao import Any4Tensor, Any4WeightOnlyConfig, LayerError, any4_weight_only, default_filter, quantize_model


def _mlp():
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32)).eval()


def test_quantize_sequential_in_place_without_module_swap():
    model = _mlp()
    ref = copy.deepcopy(model)
    modules_before = [id(m) for m in model.modules()]
    quantize_(model, any4_weight_only(group_size=32))
    assert [id(m) for m in model.modules()] == modules_before
    for layer in (model[0], model[2]):
        assert isinstance(layer.weight, nn.Parameter) and isinstance(layer.weight, Any4Tensor)
        assert not layer.weight.requires_grad
    x = torch.randn(8, 64)
    y, y_ref = model(x), ref(x)
    assert (y - y_ref).norm() / y_ref.norm() < 0.1


def test_filter_fn_is_honoured():
    model = _mlp()
    quantize_(model, any4_weight_only(group_size=32), filter_fn=lambda m, fqn: fqn == "2")
    assert not isinstance(model[0].weight, Any4Tensor)
    assert isinstance(model[2].weight, Any4Tensor)


@pytest.mark.parametrize("codebook", ["any4", "int4", "nf4", "fp4", "any3", "any2"])
def test_tiny_llama_all_codebooks(codebook):
    model = tiny_llama()
    ref = copy.deepcopy(model)
    quantize_(model, any4_weight_only(codebook=codebook, group_size=32), filter_fn=default_filter)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name, m in linears.items():
        assert isinstance(m.weight, Any4Tensor) == (name != "lm_head"), name
    ids = torch.randint(0, 128, (2, 16))
    logits, ref_logits = model(ids).logits, ref(ids).logits
    rel = ((logits - ref_logits).norm() / ref_logits.norm()).item()
    assert rel < {"any2": 0.6, "any3": 0.3}.get(codebook, 0.15), rel


def test_state_dict_round_trip_weights_only():
    model = tiny_llama()
    quantize_model(model, any4_weight_only(group_size=32), progress=False)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = tiny_llama(seed=1)
    quantize_model(fresh, any4_weight_only(group_size=32, kmeans_iterations=0), progress=False)
    fresh.load_state_dict(state)
    ids = torch.randint(0, 128, (1, 12))
    assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_in_features_not_divisible_by_group_size_uses_a_ragged_last_group():
    model = nn.Sequential(nn.Linear(576, 40))  # SmolLM2's width: 576 = 4.5 groups of 128
    w = model[0].weight.detach().clone()
    quantize_(model, any4_weight_only(group_size=128))
    qw = model[0].weight
    assert qw.scale.shape == (40, 5) and qw.shape == (40, 576)
    assert (qw.dequantize() - w).norm() / w.norm() < 0.1


def test_calibrated_quantization_runs_and_hooks_are_removed():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 32))
    stats = any4ao.calibrate(model, input_ids=ids)
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())
    assert len(stats) == 2 * 7 + 1  # q,k,v,o,gate,up,down per layer + lm_head
    layer = model.model.layers[0].mlp.down_proj
    assert stats.for_module(layer).shape == (160,) and stats.tokens_seen(layer) == 32
    quantize_model(model, any4_weight_only(group_size=32, calibration=stats), progress=False)
    assert isinstance(layer.weight, Any4Tensor)


def test_calibration_hooks_removed_when_forward_raises():
    model = tiny_llama()

    def fail(module, args):
        raise RuntimeError("forward failed")

    handle = model.model.layers[0].mlp.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="forward failed"):
        any4ao.calibrate(model, input_ids=torch.tensor([[1, 2, 3]]))
    handle.remove()
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())


def test_default_calibration_text_ships_with_the_package():
    assert len(any4ao.default_calibration_text().split()) > 200


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(codebook="any5"), "codebook"),
        (dict(codebook=4.0), "codebook"),
        (dict(version=2), "version"),
        (dict(version=True), "version"),
        (dict(version=1.0), "version"),
        (dict(kernel_preference="cutlass"), "kernel_preference"),
        (dict(group_size=100), "group_size"),
        (dict(group_size=8), "group_size"),
        (dict(codebook="nf3"), "codebook"),
        (dict(codebook="lut4"), "codebook"),
        (dict(lut_dtype=torch.int8), "lut_dtype"),
        (dict(kmeans_iterations=-1), "kmeans_iterations"),
        (dict(refine_rounds=-1), "refine_rounds"),
        (dict(refine_rounds=1.5), "refine_rounds"),
        (dict(scaling="max"), "scaling"),
        (dict(error_feedback="awq"), "error_feedback"),
        (dict(error_feedback="gptq", codebook="nf4"), "learned codebooks"),
        (dict(gptq_damp=0), "gptq_damp"),
        (dict(gptq_damp=float("nan")), "gptq_damp"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Any4WeightOnlyConfig(**kwargs)


def _poison(model, fqn, value):
    with torch.no_grad():
        model.get_submodule(fqn).weight[3, 5] = value


@pytest.mark.parametrize("value, word", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_weights_name_the_layer_and_leave_the_model_untouched(value, word):
    model = tiny_llama()
    _poison(model, "model.layers.1.mlp.up_proj", value)
    before = {n: p for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=rf"model\.layers\.1\.mlp\.up_proj.*{word}"):
        quantize_model(model, any4_weight_only(group_size=32), progress=False)
    after = dict(model.named_parameters())
    assert all(after[n] is p for n, p in before.items())  # not one layer was replaced


def test_failure_midway_restores_every_weight(monkeypatch):
    model = tiny_llama()
    before = {n: p for n, p in model.named_parameters()}
    calls = []
    real = Any4Tensor.from_hp.__func__

    def flaky(cls, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated out-of-memory")
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(Any4Tensor, "from_hp", classmethod(flaky))
    with pytest.raises(RuntimeError, match="simulated"):
        quantize_model(model, any4_weight_only(group_size=32), progress=False)
    assert all(dict(model.named_parameters())[n] is p for n, p in before.items())


def test_plain_quantize_names_the_layer_by_path_shape_or_calibration_path():
    model = tiny_llama()
    _poison(model, "model.layers.0.self_attn.k_proj", float("nan"))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj'.*NaN"):  # default_filter notes it
        quantize_(model, any4_weight_only(group_size=32), filter_fn=default_filter)
    model = tiny_llama()
    _poison(model, "model.layers.0.self_attn.k_proj", float("nan"))
    with pytest.raises(ValueError, match=r"Linear\(in_features=64, out_features=32\).*NaN"):  # own filter: shape
        quantize_(model, any4_weight_only(group_size=32), filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    stats = any4ao.calibrate(model, input_ids=torch.randint(0, 128, (1, 8)))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj.*NaN"):
        quantize_(model, any4_weight_only(group_size=32, calibration=stats), filter_fn=default_filter)


def test_plain_quantize_says_the_layers_before_the_bad_one_are_already_quantized(monkeypatch):
    model = tiny_llama()
    _poison(model, "model.layers.1.mlp.up_proj", float("nan"))
    with pytest.raises(LayerError, match=r"up_proj.*NaN.*does not undo.*quantize_model") as raised:
        quantize_(model, any4_weight_only(group_size=32), filter_fn=default_filter)
    assert isinstance(raised.value.__cause__, LayerError)
    assert 0 < sum(isinstance(p, Any4Tensor) for p in model.parameters())  # what the message warns of
    calls, real = [], Any4Tensor.from_hp.__func__

    def failing_fifth(cls, *args, **kwargs):  # an error the up-front checks cannot see
        calls.append(1)
        if len(calls) == 5:
            raise ValueError("k-means diverged")
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(Any4Tensor, "from_hp", classmethod(failing_fifth))
    model = tiny_llama()
    with pytest.raises(LayerError, match="k-means diverged") as raised:
        quantize_model(model, any4_weight_only(group_size=32), progress=False, calibration="none")
    assert "does not undo" not in str(raised.value)  # quantize_model rolled back: nothing to warn of
    assert not any(isinstance(p, Any4Tensor) for p in model.parameters())


def test_wrong_shape_and_dtype_weights_are_rejected():
    conv_like = nn.Linear(64, 32)
    conv_like.weight = nn.Parameter(torch.randn(32, 64, 1))
    with pytest.raises(ValueError, match="2-D"):
        quantize_(nn.Sequential(conv_like), any4_weight_only(group_size=32))
    int_layer = nn.Linear(64, 32)
    int_layer.weight = nn.Parameter(torch.zeros(32, 64, dtype=torch.float64), requires_grad=False)
    with pytest.raises(ValueError, match="float64"):
        quantize_(nn.Sequential(int_layer), any4_weight_only(group_size=32))


def test_calibration_from_another_model_is_rejected():
    model, other = tiny_llama(), tiny_llama(seed=2)
    stats = any4ao.calibrate(other, input_ids=torch.randint(0, 128, (1, 8)))
    with pytest.raises(ValueError, match="no calibration statistics"):
        quantize_model(model, any4_weight_only(group_size=32, calibration=stats), progress=False)


def test_config_with_dequantize_preference_round_trips_whatever_torchao_searches_first(monkeypatch):
    """torchao's config_from_dict finds classes by name in ALLOWED_AO_MODULES, a set whose order
    changes between processes; torchao.quantization has an enum called KernelPreference (no
    DEQUANTIZE). Searched first, it made 'dequantize' checkpoints fail to load at random."""
    import torchao.core.config as ao_config
    from torchao.core.config import config_from_dict, config_to_dict

    modules = sorted(ao_config.ALLOWED_AO_MODULES, key=lambda m: m == "any4ao")  # torchao's own first
    monkeypatch.setattr(ao_config, "ALLOWED_AO_MODULES", modules)
    config = Any4WeightOnlyConfig(group_size=32, kernel_preference="dequantize")
    assert config_from_dict(config_to_dict(config)).kernel_preference == "dequantize"


@pytest.mark.parametrize(
    "ids, max_tokens, message",
    [
        (torch.zeros(1, 0, dtype=torch.long), 64, "holds no token"),
        (torch.arange(8), 64, "2-D integer tensor"),
        (torch.rand(1, 8), 64, "2-D integer tensor"),
        (torch.tensor([[1, 2, 10**6]]), 64, r"lie in \[0, "),
        (torch.tensor([[1, -1]]), 64, r"lie in \[0, "),
        (torch.tensor([[1, 2, 3]]), 0, "max_tokens=0"),
        (torch.tensor([[1, 2, 3]]), -1, "max_tokens=-1"),
    ],
)
def test_calibrate_checks_its_sample(ids, max_tokens, message):
    """Bad calibration input is named before the forward (it surfaced as reshape or index errors
    inside the model, and max_tokens=-1 silently dropped the last token)."""
    with pytest.raises(ValueError, match=message):
        any4ao.calibrate(tiny_llama(layers=1), input_ids=ids, max_tokens=max_tokens)


def test_random_token_ids_are_a_seeded_sample_of_the_vocabulary():
    model = tiny_llama(layers=1)
    ids = any4ao.random_token_ids(model, tokens=300)
    assert ids.shape == (1, 300) and ids.dtype == torch.long
    assert 0 <= int(ids.min()) and int(ids.max()) < model.config.vocab_size
    assert len(ids.unique()) > model.config.vocab_size // 2  # spread over the vocabulary, not one id
    assert torch.equal(ids, any4ao.random_token_ids(model, tokens=300))  # same seed, same sample
    assert not torch.equal(ids, any4ao.random_token_ids(model, tokens=300, seed=1))
    stats = any4ao.calibrate(model, input_ids=ids)
    assert stats.tokens_seen(model.model.layers[0].mlp.down_proj) == 256  # cut to max_position_embeddings


def test_random_token_ids_take_the_vocabulary_from_the_embedding_without_a_config():
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 8)

        def get_input_embeddings(self):
            return self.embed

    assert int(any4ao.random_token_ids(Bare(), tokens=2000).max()) == 49


@pytest.mark.parametrize(
    "model, tokens, message",
    [
        (nn.Linear(4, 4), 16, "cannot tell the vocabulary size of the Linear"),
        (None, 0, "tokens=0"),
        (None, 1.5, "tokens=1.5"),
        (None, True, "tokens=True"),
    ],
)
def test_random_token_ids_reject_what_they_cannot_sample(model, tokens, message):
    with pytest.raises(ValueError, match=message):
        any4ao.random_token_ids(model if model is not None else tiny_llama(layers=1), tokens=tokens)


def _luts(model):
    return {n: p.lut.clone() for n, p in model.named_parameters() if isinstance(p, Any4Tensor)}


def test_quantize_model_calibrates_on_random_ids_when_no_tokenizer_is_given():
    """Calibration is the default (the paper's any4): without a tokenizer, a model with a vocabulary
    is calibrated on seeded random token ids (capped at its context length), exactly as if the
    caller had passed that sample; calibration="none" is the plain weight error, as quantize_ gives."""
    config = any4_weight_only(group_size=32, kmeans_iterations=3)
    default = quantize_model(tiny_llama(), config, progress=False)
    by_hand = tiny_llama()
    stats = any4ao.calibrate(by_hand, input_ids=any4ao.random_token_ids(by_hand, 256))  # context 256 < 600
    by_hand = quantize_model(by_hand, any4_weight_only(group_size=32, kmeans_iterations=3, calibration=stats))
    plain = quantize_model(tiny_llama(), config, progress=False, calibration="none")
    torchao_plain = tiny_llama()
    quantize_(torchao_plain, config, filter_fn=default_filter)
    luts, plain_luts = _luts(default), _luts(plain)
    assert luts.keys() == _luts(by_hand).keys() == plain_luts.keys() and len(luts) == 14
    assert all(torch.equal(luts[n], _luts(by_hand)[n]) for n in luts)
    assert all(torch.equal(plain_luts[n], _luts(torchao_plain)[n]) for n in luts)
    assert sum(not torch.equal(luts[n], plain_luts[n]) for n in luts) >= 12  # the sample reached the k-means
    assert all(not any(m._forward_pre_hooks) for m in default.modules())


def test_quantize_model_without_a_vocabulary_or_with_gptq_does_not_invent_a_sample():
    mlp = _mlp()
    ref = copy.deepcopy(mlp)
    quantize_model(mlp, any4_weight_only(group_size=32), progress=False)  # no vocabulary: plain
    quantize_(ref, any4_weight_only(group_size=32))
    assert torch.equal(mlp[0].weight.lut, ref[0].weight.lut)
    with pytest.raises(
        ValueError, match="needs the layer inputs. Hessians: pass tokenizer="
    ):  # GPTQ's Hessians: measured on text only
        quantize_model(tiny_llama(layers=1), any4_weight_only(group_size=32, error_feedback="gptq"), progress=False)


class _NeedsMoreInputs(nn.Module):
    """A token model whose forward needs more than input_ids (as an encoder-decoder does)."""

    def __init__(self):
        super().__init__()
        self.embed, self.proj = nn.Embedding(50, 64), nn.Linear(64, 64)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, decoder_input_ids):
        return self.proj(self.embed(input_ids))


@pytest.mark.parametrize(
    "model, kwargs, error, message",
    [
        (_NeedsMoreInputs, {}, ValueError, "on random token ids .* failed: TypeError.*calibration='none'"),
        (_NeedsMoreInputs, {"calibration": "random-ids"}, ValueError, "calibration='random-ids'.*decoder_input_ids"),
        (tiny_llama, {"calibration": "text"}, ValueError, "calibration='text' needs a tokenizer"),
        (tiny_llama, {"calibration_text": "some words"}, ValueError, "calibration_text needs the tokenizer"),
        (tiny_llama, {"calibration": "random"}, ValueError, "calibration='random', expected one of"),
        (nn.Linear, {"calibration": "random-ids"}, ValueError, "cannot tell the vocabulary size"),
    ],
)
def test_quantize_model_calibration_choices_fail_clearly_and_change_nothing(model, kwargs, error, message):
    model = model(64, 64) if model is nn.Linear else model()
    before = {n: p.clone() for n, p in model.named_parameters()}
    filter_fn = (lambda m, fqn: isinstance(m, nn.Linear)) if isinstance(model, nn.Linear) else default_filter
    with pytest.raises(error, match=message):
        quantize_model(model, any4_weight_only(group_size=32), filter_fn=filter_fn, progress=False, **kwargs)
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()
    assert all(type(after[n]) is nn.Parameter and torch.equal(after[n], before[n]) for n in before)
    assert _NeedsMoreInputs()(torch.tensor([[1]]), None).shape == (1, 1, 64)  # the model itself is fine


def test_meta_then_to_empty_then_load_state_dict_restores_every_quantized_weight():
    """The meta-device initialisation idiom (FSDP and big-model loading): to_empty raised
    NotImplementedError for aten.empty_like on an Any4Tensor."""
    source = quantize_model(tiny_llama(), any4_weight_only(group_size=32, kmeans_iterations=2), progress=False)
    target = quantize_model(tiny_llama(seed=1), any4_weight_only(group_size=32, kmeans_iterations=2), progress=False)
    target.to("meta").to_empty(device="cpu")
    empty = target.model.layers[0].mlp.up_proj.weight
    assert isinstance(empty, Any4Tensor) and empty.qdata.device.type == "cpu" and not empty.lut.any()
    target.load_state_dict(source.state_dict())
    params = dict(source.named_parameters())
    assert all(type(p) is type(params[n]) and torch.equal(p, params[n]) for n, p in target.named_parameters())


def test_configs_saved_with_the_old_enum_name_load_in_every_process():
    """Checkpoints written before the kernel-preference enum was renamed say "KernelPreference";
    torchao looks that name up in a set of modules, so whether it found its own enum (no DEQUANTIZE:
    the load failed) depended on the hash seed. Read in fresh interpreters with several seeds."""
    import os
    import subprocess
    import sys

    code = (
        "import any4ao, torchao.core.config as c\n"
        "any4ao.register_with_torchao()\n"
        "d = c.config_to_dict(any4ao.Any4WeightOnlyConfig(group_size=32, kernel_preference='dequantize'))\n"
        "d['_data']['kernel_preference']['_type'] = 'KernelPreference'\n"
        "print(c.config_from_dict(d).kernel_preference.value)\n"
    )
    for seed in range(6):
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip().endswith("dequantize"), (seed, out.stderr[-800:])


def test_calibrate_leaves_padding_out_with_an_attention_mask():
    """A right-padded batch of two samples: with the mask, each layer's statistics are those of the two
    samples calibrated one by one (causal attention: the padding cannot reach earlier tokens), and the
    padding positions are not counted."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 128, (1, 10), generator=g), torch.randint(0, 128, (1, 6), generator=g)
    batch = torch.cat([a, torch.cat([b, torch.zeros(1, 4, dtype=torch.long)], 1)])
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    masked = any4ao.calibrate(model, input_ids=batch, attention_mask=mask)
    alone = [any4ao.calibrate(model, input_ids=ids) for ids in (a, b)]
    for module in masked.names.values():
        assert masked.tokens_seen(module) == 16
        expected = (alone[0].for_module(module) * 10 + alone[1].for_module(module) * 6) / 16
        torch.testing.assert_close(masked.for_module(module), expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"attention_mask must be a tensor of the input_ids' shape \(2, 10\)"):
        any4ao.calibrate(model, input_ids=batch, attention_mask=mask[:, :5])
    with pytest.raises(ValueError, match="only 0 .padding. and 1"):
        any4ao.calibrate(model, input_ids=batch, attention_mask=mask * 2)
