"""What `any4ao demo` and `any4ao eval` share: argument checks that run before anything loads,
one-line errors (exit status 2 for bad arguments, 1 for failures while running; the traceback
only with --debug or ANY4AO_DEBUG=1), --help that shows every default."""

import argparse
import importlib.util
import logging
import os
import sys
import tempfile
from typing import Callable, Iterable, List, Optional, Sequence

from any4ao.evaluation.methods import METHODS, MethodSettings, check_methods, validate_settings
from any4ao.evaluation.texts import load_text


class UsageError(ValueError):
    """A bad argument, found before anything is loaded: exit status 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's layout and appends '(default: X)' to options that have a default
    (not to flags or options whose default is None: their help says what None means)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        if "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse prints the whole usage block first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get("ANY4AO_DEBUG", "") not in ("", "0")


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks and library warnings (or ANY4AO_DEBUG=1)")


def quiet_libraries(debug: bool) -> None:
    """Outside --debug, hide what transformers and torch log while loading (their warnings are
    about the environment, not about this run's result)."""
    if debug:
        return
    for name in ("transformers", "accelerate", "torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run_command(prog: str, body: Callable[[List[str]], object], argv: Optional[Sequence[str]] = None):
    """Run `body(argv)`; a UsageError exits 2, any other exception exits 1, each as one line on
    stderr (`prog: error: ...`), the traceback only with --debug / ANY4AO_DEBUG=1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    quiet_libraries(debug)
    try:
        return body(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except UsageError as e:
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as e:  # noqa: BLE001 - the one-line report is the point
        if debug:
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"{prog}: error: {type(e).__name__}: {message} (run with --debug for the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


def require_eval_extra(command: str, modules: Iterable[str] = ("transformers", "tqdm", "gguf")) -> None:
    """UsageError naming the extra when a module it provides is missing (checked, not imported)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(
            f"any4ao {command} needs the eval extra: pip install 'any4ao[eval]' (missing: {', '.join(missing)})"
        )


def parse_methods(text: str, allowed=METHODS) -> List[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise UsageError("--methods is empty; choose from " + ",".join(allowed))
    try:
        check_methods(methods)
    except ValueError as e:
        raise UsageError(str(e)) from None
    duplicates = sorted({m for m in methods if methods.count(m) > 1})
    if duplicates:
        raise UsageError(f"--methods lists {', '.join(duplicates)} more than once")
    return methods


def check_settings(methods: Sequence[str], settings: MethodSettings) -> None:
    """Every Any4WeightOnlyConfig the methods will build, built now (bad group size etc.)."""
    try:
        validate_settings(methods, settings)
    except ValueError as e:
        message = str(e)
        for field in ("group_size", "kmeans_iterations", "refine_rounds"):  # the options that set them
            message = message.replace(field, "--" + field.replace("_", "-"))
        raise UsageError(message) from None


def check_positive(value: int, option: str, minimum: int = 1) -> None:
    if value < minimum:
        raise UsageError(f"{option} must be >= {minimum}, got {value}")


def read_text(name_or_path: str, option: str) -> str:
    try:
        return load_text(name_or_path)
    except (OSError, ValueError) as e:
        raise UsageError(f"{option}: {e}") from None


def check_device(device: str):
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: the evaluation runs on cpu or cuda devices")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def check_output_dir(path: str, option: str = "--out") -> None:
    from pathlib import Path

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{option} {path!r} exists and is not a directory")
    parent = p
    while not parent.exists():
        parent = parent.parent
    try:  # a real write: os.access says yes to root everywhere, /proc included
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise UsageError(f"{option} {path!r}: {parent} is not writable ({e.strerror or e})") from None
