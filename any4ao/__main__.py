"""`python -m any4ao <command>` / `any4ao <command>`.

Errors are one line on stderr: exit status 2 for a bad command or argument (checked before any
model is loaded), 1 for a failure while running; `--debug` (or ANY4AO_DEBUG=1) shows tracebacks.
"""

import importlib
import logging
import os
import sys

COMMANDS = {
    "demo": ("any4ao.demo", "quantize a real LLM with int4/fp4/nf4/any4 and compare greedy continuations"),
    "eval": ("any4ao.evaluation.cli", "WikiText-2 perplexity of every codebook, with bootstrap intervals"),
}
USAGE = "usage: any4ao [--version] <command> [options]   (any4ao <command> --help for its options)"

# Import-time noise of torch/torchao that says nothing about a CPU run of this CLI: torchao's CUDA
# extensions (_C_mxfp8, _C_cutlass_90a) failing to load, and torch's deprecation of register_constant
# on Enum classes (torchao's KernelPreference, ScaleCalculationMode).
_NOISE = {
    "torchao": ("Failed to load",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
}


class _DropNoise(logging.Filter):
    def __init__(self, prefixes):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p in message for p in self.prefixes)


def silence_import_noise() -> None:
    """Filter the messages in _NOISE out of their loggers (idempotent; the CLI only, never on
    import of the library, and not with --debug / ANY4AO_DEBUG=1). It only catches what is logged
    after it runs: `any4ao <command>` imports the package (any4ao/__init__.py, which imports
    torchao) before this module, so the import-time lines still show until that import is lazy."""
    for name, prefixes in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(prefixes))


def _usage(stream) -> None:
    print(USAGE + "\n\ncommands:", file=stream)
    for name, (_, help_text) in COMMANDS.items():
        print(f"  {name:8s} {help_text}", file=stream)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("ANY4AO_DEBUG", "") not in ("", "0")
    if not debug:
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
