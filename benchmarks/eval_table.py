"""One README quality row per model and group, merged from several `any4ao eval` runs.

    python benchmarks/eval_table.py "SmolLM2-135M, 64=benchmarks/results/eval-smollm2-g64-w32-fixed-gptq,..." ...

Each argument is LABEL=DIR[,DIR...]: the eval.json of each folder is read and each method taken from
the first folder that has it. Runs merge only if they scored the same windows with the same baseline
and nf4 (identical per-window NLL, checked): then one paired bootstrap over the merged methods gives the
same intervals as one run with all of them. Prints the markdown rows (PPL and, in brackets, the
increase over the baseline as a multiple of nf4's with its 95 % interval; ≈ not resolved).
"""

import argparse
import json
from pathlib import Path

from any4ao.evaluation.cli import UNRESOLVED, EvalRow, add_intervals

COLUMNS = ("int4", "fp4", "nf4", "any4", "any4+cal", "any4+gptq")


def merged_rows(folders):
    rows, sources, reference = {}, {}, None
    for folder in folders:
        record = json.loads((Path(folder) / "eval.json").read_text())
        by_method = {r["method"]: r for r in record["rows"]}
        anchors = {m: by_method[m]["window_nll"] for m in ("baseline", "nf4") if m in by_method}
        if reference is None:
            reference = anchors
        elif any(reference.get(m, nll) != nll for m, nll in anchors.items()):
            raise SystemExit(f"{folder}: its baseline or nf4 differs from {folders[0]}: other windows or model")
        for method, row in by_method.items():
            if method not in rows:
                fields = {k: v for k, v in row.items() if k in EvalRow.__dataclass_fields__}
                rows[method] = EvalRow(
                    **{**fields, "vs_baseline": None, "vs_nf4": None, "delta_ppl_ratio_vs_nf4": None}
                )
                sources[method] = folder
    return list(rows.values()), sources


def cell(row: EvalRow) -> str:
    if row.method == "nf4":
        return f"{row.perplexity:.2f}"
    ratio = row.delta_ppl_ratio_vs_nf4
    unresolved = row.vs_nf4 and not row.vs_nf4["resolved"]
    interval = f" {UNRESOLVED}" if unresolved else f" [{ratio[1]:.2f}, {ratio[2]:.2f}]"
    return f"{row.perplexity:.2f} ({ratio[0]:.2f}x{interval})"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rows", nargs="+", help="LABEL=DIR[,DIR...]")
    args = p.parse_args(argv)
    print("| model, group | baseline | " + " | ".join(COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    notes = []
    for spec in args.rows:
        label, _, folders = spec.partition("=")
        rows, sources = merged_rows(folders.split(","))
        add_intervals(rows)
        by_method = {r.method: r for r in rows}
        cells = [cell(by_method[m]) if m in by_method else "-" for m in COLUMNS]
        print(f"| {label} | {by_method['baseline'].perplexity:.2f} | " + " | ".join(cells) + " |")
        for folder in dict.fromkeys(sources.values()):
            notes.append(f"- {label}: {', '.join(m for m, f in sources.items() if f == folder)} from {folder}")
    print("\nSources:\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
