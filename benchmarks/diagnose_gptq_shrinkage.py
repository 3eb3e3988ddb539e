"""GPTQ with a one-sample Hessian: output error on the calibration tokens (in-sample) and on 2048
held-out WikiText-2 test tokens, for several shrinkages of E[x x^T] toward its diagonal.

    python benchmarks/diagnose_gptq_shrinkage.py MODEL GROUP EVERY_NTH_LAYER

"gptq d.01": GPTQ on the raw sample Hessian (dampening 0.01); "s.5" / "s.9": shrunk with l = 0.5 /
0.9; "sKT": l = K / (K + T). Means of tr(E H E^T) / tr(W H W^T) over every n-th linear layer.
CPU, fp32.
"""

import sys, torch, collections
from torch import nn
from any4ao import Any4WeightOnlyConfig, default_calibration_text
from any4ao.codebooks.quantize import quantize_weight
from any4ao.codebooks.gptq import dequantize_codes
from any4ao.evaluation import load_text
from any4ao.models import load_causal_lm
torch.manual_seed(0)
name, G = sys.argv[1], int(sys.argv[2])
model, tok, _ = load_causal_lm(name, dtype=torch.float32, progress=False)
H, N = {}, {}
def hook(m, args):
    x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
    H[m] = H.get(m, 0) + x.T @ x; N[m] = N.get(m, 0) + x.shape[0]
lins = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]
hs = [m.register_forward_pre_hook(hook) for _, m in lins]
with torch.no_grad(): model(tok(default_calibration_text(), return_tensors="pt").input_ids[:, :2048])
Hcal = {m: h / N[m] for m, h in H.items()}; TOK = list(N.values())[0]; print("tokens", TOK); H.clear(); N.clear()
with torch.no_grad(): model(tok(load_text("wikitext-2-test"), return_tensors="pt").input_ids[:, :2048])
for h in hs: h.remove()
def shrink(h, a):
    if a == "kt": a = h.shape[0] / (h.shape[0] + TOK)
    return (1 - a) * h + a * torch.diag(torch.diagonal(h))

variants = {"cal": None, "gptq d.01": (0.01, 0), "gptq s.5": (0.01, 0.5), "gptq sKT": (0.01, "kt"), "gptq s.9": (0.01, 0.9)}
agg = collections.defaultdict(float); ins = collections.defaultdict(float)
layers = lins[::int(sys.argv[3])]
for n, m in layers:
    W = m.weight.detach().float(); k = W.shape[1]
    Ht = H[m] / N[m]; Hc = Hcal[m]
    cw = torch.diagonal(Hc).float().clone()
    base = float(torch.trace(W.double() @ Ht @ W.double().T)); basec = float(torch.trace(W.double() @ Hc @ W.double().T))
    for v, o in variants.items():
        if o is None:
            q = quantize_weight(W, Any4WeightOnlyConfig(group_size=G), cw)
        else:
            q = quantize_weight(W, Any4WeightOnlyConfig(group_size=G, error_feedback="gptq", gptq_damp=o[0]), cw, shrink(Hc, o[1]).float())
        E = (W - dequantize_codes(q.codes, q.lut.float(), q.scale.float(), q.zero_point.float(), G)).double()
        agg[v] += float(torch.trace(E @ Ht @ E.T)) / base; ins[v] += float(torch.trace(E @ Hc @ E.T)) / basec
print(name, G, "layers", len(layers))
for v in variants: print(f"{v:16s} held-out {agg[v]/len(layers):.5f}  in-sample {ins[v]/len(layers):.5f}")
