"""Which choices make any4 beat nf4: one perplexity per quantization variant, one model, one protocol.

    python benchmarks/ablate_quality.py [--group-size 64] [--windows 8] [--only NAME,...]

Same protocol as `any4ao eval` (WikiText-2 test shipped in the package, first N windows of 512
tokens, fp32 model on CPU, calibration on the package's one-sample prompt). Every variant goes
through `quantize_model(model, Any4WeightOnlyConfig(...))`. Writes
benchmarks/results/ablation-<model>-g<G>.{json,md}.
"""

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

from any4ao import Any4WeightOnlyConfig, calibrate, quantize_model
from any4ao.evaluation import load_text, perplexity, token_windows
from any4ao.models import load_causal_lm

# name -> (config overrides, calibration statistic or None). Each line changes one thing from a
# line above it; "it" = Lloyd iterations, "refit" = rounds of scale/zero refitting (refine.py).
PAPER = {"codebook": "any4", "kmeans_iterations": 30, "refine_rounds": 0}
DEFAULT = {"codebook": "any4", "kmeans_iterations": 10, "refine_rounds": 2}
VARIANTS = {
    "int4 (RTN, min/max)": ({"codebook": "int4"}, None),
    "fp4 (absmax)": ({"codebook": "fp4"}, None),
    "nf4 (absmax)": ({"codebook": "nf4"}, None),
    "any4 min/max, unweighted, 30 it": (PAPER, None),
    "any4 min/max, mean|x| weights, 30 it": (PAPER, "abs"),
    "any4 min/max, mean x^2 weights, 30 it": (PAPER, "square"),
    "any4 min/max, x^2, 10 it": ({**PAPER, "kmeans_iterations": 10}, "square"),
    "any4 min/max, x^2, 10 it, refit x1": ({**DEFAULT, "refine_rounds": 1}, "square"),
    "any4 min/max, x^2, 10 it, refit x2 (default)": (DEFAULT, "square"),
    "any4 min/max, x^2, 10 it, refit x4": ({**DEFAULT, "refine_rounds": 4}, "square"),
    "any4 min/max, unweighted, 10 it, refit x2": (DEFAULT, None),
    "any4 absmax, x^2, 10 it, refit x2": ({**DEFAULT, "scaling": "absmax"}, "square"),
    "default with bf16 LUT/scales/zeros": ({**DEFAULT, "lut_dtype": torch.bfloat16}, "square"),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--only", help="comma-separated variant names (default: all)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(VARIANTS)
    torch.manual_seed(0)
    base, tokenizer, model_name = load_causal_lm(args.model, dtype=torch.float32)
    ids = tokenizer(load_text("wikitext-2-test"), return_tensors="pt", add_special_tokens=False).input_ids
    windows = token_windows(ids, 512, max_windows=args.windows)
    rows = [{"variant": "fp32 baseline", "perplexity": perplexity(base, windows, progress=False).perplexity}]
    print(f"{model_name}: fp32 {rows[0]['perplexity']:.3f}", flush=True)
    for name in names:
        overrides, statistic = VARIANTS[name]
        model = copy.deepcopy(base)
        start = time.perf_counter()
        calibration = calibrate(model, tokenizer, statistic=statistic) if statistic else None
        quantize_model(
            model,
            Any4WeightOnlyConfig(group_size=args.group_size, calibration=calibration, **overrides),
            progress=False,
            calibration="none",  # the variant's own statistic or none, not quantize_model's default
        )
        if "lut_dtype" in overrides:
            nn.Module.float(
                model
            )  # bf16-rounded parts, fp32 activations like the rest (transformers refuses .float() on quantized models)
        seconds = time.perf_counter() - start
        ppl = perplexity(model, windows, progress=False).perplexity
        rows.append(
            {
                "variant": name,
                "perplexity": ppl,
                "quantize_seconds": seconds,
                "config": {k: str(v) for k, v in overrides.items()},
                "calibration": statistic,
            }
        )
        print(f"{name}: {ppl:.3f} ({seconds:.1f} s)", flush=True)
        write_results(rows, args, argv, model_name, len(windows))
    print("\n" + write_results(rows, args, argv, model_name, len(windows)))


def write_results(rows, args, argv, model_name, num_windows) -> str:
    """Table + JSON of the rows so far (called after every variant, so a stopped run keeps them)."""
    base_ppl = rows[0]["perplexity"]
    nf4 = next((r["perplexity"] for r in rows if r["variant"].startswith("nf4")), None)
    lines = [
        f"`python benchmarks/ablate_quality.py {' '.join(argv if argv is not None else sys.argv[1:])}`".replace(
            " `", "`"
        ),
        "",
        f"{model_name}, group {args.group_size}, WikiText-2 test, {num_windows} x 512 tokens, fp32 on "
        f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads), torch {torch.__version__}",
        "",
        "| variant | perplexity | increase | increase / nf4's | calibrate + quantize s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        inc = r["perplexity"] - base_ppl
        ratio = f"{inc / (nf4 - base_ppl):.2f}" if nf4 and r is not rows[0] else "-"
        sec = f"{r['quantize_seconds']:.1f}" if "quantize_seconds" in r else "-"
        lines.append(
            f"| {r['variant'].replace('|', chr(92) + '|')} | {r['perplexity']:.2f} | {'-' if r is rows[0] else f'+{inc:.2f}'} | {ratio} | {sec} |"
        )
    table = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"ablation-{model_name.split('/')[0].split('.')[0]}-g{args.group_size}"
    (out / f"{stem}.md").write_text(table + "\n")
    (out / f"{stem}.json").write_text(
        json.dumps(
            {
                "model": model_name,
                "group_size": args.group_size,
                "windows": num_windows,
                "torch": torch.__version__,
                "rows": rows,
            },
            indent=2,
        )
    )
    return table


if __name__ == "__main__":
    main()
