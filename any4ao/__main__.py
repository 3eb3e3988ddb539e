"""`python -m any4ao <command>` / `any4ao <command>`."""

import sys

COMMANDS = {
    "demo": ("any4ao.demo", "quantize a real LLM with int4/fp4/nf4/any4 and compare them"),
    "eval": ("any4ao.evaluation.cli", "WikiText-2 perplexity of every codebook (table, JSON, bar chart)"),
}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: any4ao <command> [options]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:8s} {help_text}")
        sys.exit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    import importlib

    importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    main()
