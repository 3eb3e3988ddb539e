"""GPTQ with a one-sample Hessian: output error on the calibration tokens (in-sample) and on 2048
held-out WikiText-2 test tokens, for several shrinkages of E[x x^T] toward its diagonal.

    python benchmarks/diagnose_gptq_shrinkage.py MODEL GROUP EVERY_NTH_LAYER

"raw": GPTQ on the sample Hessian (dampening 0.01); "l=0.5" / "l=0.9": shrunk with that intensity;
"l=K/(K+T)": the rule ChannelImportance.shrinkage_for takes as its floor. Means of
tr(E H E^T) / tr(W H W^T) over every n-th linear layer; CPU, fp32.
"""

import collections
import sys

import torch
from diagnose_output_error import second_moments
from torch import nn

from any4ao import Any4WeightOnlyConfig, default_calibration_text
from any4ao.codebooks.gptq import dequantize_codes
from any4ao.codebooks.quantize import quantize_weight
from any4ao.evaluation import load_text
from any4ao.models import load_causal_lm

SHRINK = {"any4+cal (nearest codes)": None, "raw": 0.0, "l=0.5": 0.5, "l=K/(K+T)": "kt", "l=0.9": 0.9}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    name, group, every = argv[0], int(argv[1]), int(argv[2])
    torch.manual_seed(0)
    model, tok, _ = load_causal_lm(name, dtype=torch.float32, progress=False)
    lins = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]
    cal_ids = tok(default_calibration_text(), return_tensors="pt").input_ids[:, :2048]
    cal = second_moments(model, lins, cal_ids)
    held_out = second_moments(model, lins, tok(load_text("wikitext-2-test"), return_tensors="pt").input_ids[:, :2048])
    tokens = cal_ids.shape[1]
    totals = {"held-out": collections.defaultdict(float), "in-sample": collections.defaultdict(float)}
    layers = lins[::every]
    for _, m in layers:
        w = m.weight.detach().float()
        cw = torch.diagonal(cal[m]).float().clone()
        for variant, shrink in SHRINK.items():
            if shrink is None:
                q = quantize_weight(w, Any4WeightOnlyConfig(group_size=group), cw)
            else:
                k = w.shape[1]
                lam = k / (k + tokens) if shrink == "kt" else shrink
                h = (1 - lam) * cal[m] + lam * torch.diag(torch.diagonal(cal[m]))
                q = quantize_weight(w, Any4WeightOnlyConfig(group_size=group, error_feedback="gptq"), cw, h.float())
            e = (w - dequantize_codes(q.codes, q.lut.float(), q.scale.float(), q.zero_point.float(), group)).double()
            for where, h in (("held-out", held_out[m]), ("in-sample", cal[m])):
                base = torch.trace(w.double() @ h @ w.double().T)
                totals[where][variant] += float(torch.trace(e @ h @ e.T) / base)
    print(f"{name}, group {group}, {len(layers)} layers, {tokens} calibration tokens")
    print("| variant | held-out | in-sample |\n|---|---|---|")
    for variant in SHRINK:
        print(
            f"| {variant} | {totals['held-out'][variant] / len(layers):.5f} | {totals['in-sample'][variant] / len(layers):.5f} |"
        )


if __name__ == "__main__":
    main()
