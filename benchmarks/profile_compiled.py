"""Where the host time of a compiled decode step goes when it runs without CUDA graphs
(torch.compile default mode): cProfile of back-to-back steps, top functions by own time.

    python benchmarks/profile_compiled.py [--layers 8] [--method any4] [--steps 50] [--top 30]

The model is bench_generate's Llama-3-8B-shaped model (random weights, --layers decoder blocks),
batch 1, static KV cache of 640; the step is torch.compile(fullgraph=True) of one decode step.
"""

import argparse
import cProfile
import io
import pstats
import time

import torch
from bench_generate import CONFIGS, NEW, PROMPT, build

from any4ao import Any4WeightOnlyConfig, quantize_model


@torch.no_grad()
def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--method", default="any4", choices=["any4", "bf16", "torchao-int4"])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args()
    from transformers import StaticCache

    model, config = build("llama3-8b", args.layers)
    if args.method == "any4":
        quantize_model(model, Any4WeightOnlyConfig(group_size=128), progress=False, calibration="none")  # speed only
    elif args.method == "torchao-int4":
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        quantize_(model, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
    cache = StaticCache(config=config, max_cache_len=PROMPT + NEW)
    token = torch.randint(0, config.vocab_size, (1, 1), device="cuda")
    pos = torch.tensor([PROMPT + NEW - 1], device="cuda")
    step = torch.compile(
        lambda: model(input_ids=token, past_key_values=cache, cache_position=pos, use_cache=True).logits,
        fullgraph=True,
    )
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1e3 / args.steps
    print(f"{args.method}, {args.layers} layers ({CONFIGS['llama3-8b']['hidden_size']} hidden): {ms:.2f} ms per step")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.top)
    print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:8000])


if __name__ == "__main__":
    main()
