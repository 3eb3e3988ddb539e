"""Which layer type makes one codebook lose to another in perplexity, and how far perplexity moves
between equally good quantizations of the same method (the draw noise that the eval's window
bootstrap does not see).

    python benchmarks/diagnose_layer_swap.py MODEL GROUP [--base any4] [--swap nf4] [--jitter 3]
                                             [--windows 32] [--out FILE.md]

Rows: every linear layer (lm_head excepted) from --base; every one from --swap; then --base with one
layer type at a time taken from --swap. Then --jitter replicates of each method, each quantizing the
weights times (1 + 1e-3 * N(0, 1)) (seed 1, 2, ...): a perturbation far below the quantization
step, which only moves weights that sit near a decision boundary. Weights are quantized with
quantize_weight and written back dequantized in fp32 (no calibration), so the rows compare
codebooks, not kernels. CPU, fp32; about 10 minutes for SmolLM2-135M at 32 windows.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from any4ao import Any4WeightOnlyConfig
from any4ao.codebooks.gptq import dequantize_codes
from any4ao.codebooks.quantize import quantize_weight
from any4ao.evaluation import load_text
from any4ao.evaluation.perplexity import default_bos, perplexity, token_windows
from any4ao.models import load_causal_lm

JITTER = 1e-3


def dequantized(w: torch.Tensor, codebook: str, group: int, seed: int) -> torch.Tensor:
    if seed:
        g = torch.Generator().manual_seed(seed)
        w = w * (1 + JITTER * torch.randn(w.shape, generator=g))
    q = quantize_weight(w, Any4WeightOnlyConfig(codebook=codebook, group_size=group))
    return dequantize_codes(q.codes, q.lut.float(), q.scale.float(), q.zero_point.float(), group)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("group", type=int)
    p.add_argument("--base", default="any4")
    p.add_argument("--swap", default="nf4")
    p.add_argument("--jitter", type=int, default=3, help="replicates per method (0: none)")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tok, _ = load_causal_lm(args.model, dtype=torch.float32, progress=False)
    model.eval()
    lins = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]
    ids = tok(load_text("wikitext-2-test"), return_tensors="pt", add_special_tokens=False).input_ids
    windows = token_windows(ids, 512, max_windows=args.windows, bos_token_id=default_bos(tok))
    original = {n: m.weight.detach().float().clone() for n, m in lins}
    types = sorted({n.rsplit(".", 1)[-1] for n, _ in lins})

    def quantized(codebook, seed=0):
        t = time.perf_counter()
        out = {n: dequantized(w, codebook, args.group, seed) for n, w in original.items()}
        print(f"  {codebook} seed {seed}: quantized in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        return out

    def ppl(weights: dict) -> float:
        with torch.no_grad():
            for n, m in lins:
                m.weight.copy_(weights[n])
        return perplexity(model, windows, progress=False).perplexity

    base, swap = quantized(args.base), quantized(args.swap)
    rows = [(f"all {args.base}", ppl(base)), (f"all {args.swap}", ppl(swap))]
    for t in types:
        mixed = {n: (swap if n.endswith("." + t) else base)[n] for n in original}
        rows.append((f"{args.base}, {t} from {args.swap}", ppl(mixed)))
    for codebook in (args.base, args.swap):
        seeds = [ppl(quantized(codebook, s)) for s in range(1, args.jitter + 1)]
        if seeds:
            spread = f"mean {statistics.mean(seeds):.3f}" + (
                f", sd {statistics.stdev(seeds):.3f}" if len(seeds) > 1 else ""
            )
            rows.append((f"{codebook}, jittered x{len(seeds)} ({', '.join(f'{s:.3f}' for s in seeds)})", spread))
    lines = [
        f"`python benchmarks/diagnose_layer_swap.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
        "",
        f"{args.model}, group {args.group}, WikiText-2 test, {args.windows} x 512 tokens, fp32 CPU, torch {torch.__version__}",
        "",
        "| weights | perplexity |",
        "|---|---|",
    ] + [f"| {name} | {v if isinstance(v, str) else f'{v:.3f}'} |" for name, v in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
