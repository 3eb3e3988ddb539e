"""Quiet the import-time noise of torch/torchao for the command line only.

`any4ao <command>` and `python -m any4ao` import the package (and so torchao) before the CLI's
own code runs, so the filter has to go in before that import: any4ao/__init__.py installs it
first thing when `invoked_as_cli()`. This module imports nothing but the standard library.
"""

import logging
import os
import sys

# Messages that say nothing about a CPU run of the CLI: torchao's CUDA extensions (_C_mxfp8,
# _C_cutlass_90a) failing to load, and torch's deprecation of register_constant on Enum classes
# (torchao's KernelPreference, ScaleCalculationMode).
NOISE = {
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


def debugging(argv=None) -> bool:
    """--debug on the command line or ANY4AO_DEBUG set: show everything, tracebacks included."""
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get("ANY4AO_DEBUG", "") not in ("", "0")


def invoked_as_cli() -> bool:
    """The `any4ao` console script, or `python -m any4ao` (Python sets sys.argv[0] to "-m" while it
    imports the package to locate its __main__). A library import never matches, so a program that
    imports any4ao keeps every message torch and torchao log."""
    argv0 = sys.argv[0] if sys.argv else ""
    return argv0 == "-m" or os.path.basename(argv0) == "any4ao"


def silence_import_noise() -> None:
    """Filter the messages in NOISE out of their loggers (idempotent)."""
    for name, prefixes in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(prefixes))
