"""Which layers carry the quantization loss: per layer type, the relative output error
tr(E H E^T) / tr(W H W^T) (E = W - W_hat, H = E[x x^T] of the layer's inputs on 2048 tokens of
WikiText-2 test: held out from the calibration prompt), and the relative weight error, for the
fixed grids and any4 variants.

    python benchmarks/diagnose_output_error.py MODEL GROUP

Prints a table (mean over the layers of each type). CPU, fp32; about 7 minutes for Gemma 3 270M.
"""

import collections
import sys

import torch
from torch import nn

from any4ao import Any4WeightOnlyConfig, default_calibration_text
from any4ao.codebooks.gptq import dequantize_codes
from any4ao.codebooks.quantize import quantize_weight
from any4ao.evaluation import load_text
from any4ao.models import load_causal_lm

VARIANTS = {
    "int4": dict(codebook="int4"),
    "nf4": dict(codebook="nf4"),
    "fp4": dict(codebook="fp4"),
    "any4 minmax": dict(codebook="any4", scaling="minmax"),
    "any4 absmax": dict(codebook="any4", scaling="absmax"),
    "any4 auto": dict(codebook="any4", scaling="auto"),
    "any4 minmax+cal": dict(codebook="any4", scaling="minmax", cal=True),
    "any4 absmax+cal": dict(codebook="any4", scaling="absmax", cal=True),
    "any4 auto+cal": dict(codebook="any4", scaling="auto", cal=True),
}


def second_moments(model, lins, ids):
    sums, counts = {}, {}

    def hook(m, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        sums[m] = sums.get(m, 0) + x.T @ x
        counts[m] = counts.get(m, 0) + x.shape[0]

    handles = [m.register_forward_pre_hook(hook) for _, m in lins]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return {m: s / counts[m] for m, s in sums.items()}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    name, group = argv[0], int(argv[1])
    names = argv[2].split(",") if len(argv) > 2 else list(VARIANTS)
    torch.manual_seed(0)
    model, tok, _ = load_causal_lm(name, dtype=torch.float32, progress=False)
    lins = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]
    cal = second_moments(model, lins, tok(default_calibration_text(), return_tensors="pt").input_ids[:, :2048])
    held_out = second_moments(model, lins, tok(load_text("wikitext-2-test"), return_tensors="pt").input_ids[:, :2048])
    out = collections.defaultdict(lambda: collections.defaultdict(float))
    for fqn, m in lins:
        w = m.weight.detach().float()
        h = held_out[m]
        base = torch.trace(w.double() @ h @ w.double().T)
        for v in names:
            o = dict(VARIANTS[v])
            cw = torch.diagonal(cal[m]).float() if o.pop("cal", False) else None
            q = quantize_weight(w, Any4WeightOnlyConfig(group_size=group, **o), cw)
            e = (w - dequantize_codes(q.codes, q.lut.float(), q.scale.float(), q.zero_point.float(), group)).double()
            rel = float(torch.trace(e @ h @ e.T) / base)
            for key in (fqn.split(".")[-1], "ALL"):
                out[key][v] += rel
            out["weight error (ALL)"][v] += float(e.square().sum() / w.double().square().sum())
    count = collections.Counter(fqn.split(".")[-1] for fqn, _ in lins)
    count["ALL"] = count["weight error (ALL)"] = len(lins)
    print(f"{name}, group {group}: mean relative output error per layer type (held-out H)")
    print("| layer | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for key, row in out.items():
        print(f"| {key} | " + " | ".join(f"{row[v] / count[key]:.5f}" for v in names) + " |")


if __name__ == "__main__":
    main()
