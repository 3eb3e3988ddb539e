"""`python -m any4ao <command>` / `any4ao <command>`.

Errors are one line on stderr: exit status 2 for a bad command or argument (checked before any
model is loaded), 1 for a failure while running; `--debug` (or ANY4AO_DEBUG=1) shows tracebacks.
"""

import importlib
import sys

from any4ao.cli_noise import debugging, silence_import_noise

COMMANDS = {
    "demo": ("any4ao.demo", "quantize a real LLM with int4/fp4/nf4/any4 and compare greedy continuations"),
    "eval": ("any4ao.evaluation.cli", "WikiText-2 perplexity of every codebook, with bootstrap intervals"),
}
USAGE = "usage: any4ao [--version] <command> [options]   (any4ao <command> --help for its options)"


def _usage(stream) -> None:
    print(USAGE + "\n\ncommands:", file=stream)
    for name, (_, help_text) in COMMANDS.items():
        print(f"  {name:8s} {help_text}", file=stream)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not debugging(argv):
        silence_import_noise()
    if argv and argv[0] == "--debug":
        argv = argv[1:] + ["--debug"]
    if not argv:
        _usage(sys.stderr)
        sys.exit(2)
    if argv[0] in ("-h", "--help"):
        _usage(sys.stdout)
        sys.exit(0)
    if argv[0] == "--version":
        from any4ao import __version__

        print(f"any4ao {__version__}")
        sys.exit(0)
    if argv[0] not in COMMANDS:
        print(
            f"any4ao: error: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)} (see any4ao --help)",
            file=sys.stderr,
        )
        sys.exit(2)
    importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    main()
