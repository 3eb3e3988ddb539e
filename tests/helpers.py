"""Independent float64 references used by the tests (no any4ao code on the reference side), and a
runner for checks that need a fresh Python process."""

import os
import subprocess
import sys

import torch


def reference_dequantize(codes, lut, scales, zeros, group_size):
    """W[n, k] = lut[n, code[n, k]] * scale[n, k // G] + zero[n, k // G], in float64, by plain indexing."""
    n, k = codes.shape
    cols = torch.arange(k)
    group = cols // group_size
    rows = torch.arange(n)[:, None]
    values = lut.double()[rows, codes.long()]
    return values * scales.double()[rows, group[None, :]] + zeros.double()[rows, group[None, :]]


def weighted_error(w, w_hat, channel_weight=None, per_row=False):
    diff2 = (w.double() - w_hat.double()).square()
    if channel_weight is not None:
        diff2 = diff2 * channel_weight.double()[None, :]
    return diff2.sum(1) if per_row else diff2.sum().item()


def run_in_fresh_process(code: str, unset=()) -> None:
    """Run `code` in a new interpreter (import-order and first-call behaviour, or without the test
    session's environment variables in `unset`); it must print "ok" last."""
    env = {k: v for k, v in os.environ.items() if k not in unset} | {"PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
