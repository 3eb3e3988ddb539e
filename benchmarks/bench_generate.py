"""End-to-end generation speed on the GPU: bf16 vs torchao int4 (tinygemm) vs any4.

    python benchmarks/bench_generate.py [--config llama3-8b] [--layers N] [--out DIR]

The model is a Llama-architecture model built from a real config (Llama-3-8B's by default) with
RANDOM weights: speed does not depend on the values, and nothing can be downloaded on the
benchmark machine. Per method and batch size B in {1, 8, 32}:
  - time to first token: prefill of B x 512 prompt tokens into a static KV cache (median of 3);
  - decode: one step of B x 1 tokens at KV length 512 + 128, captured in a CUDA graph and replayed
    (eager kernels, no Python overhead); with --compile the step is torch.compile(fullgraph=True)
    (inductor, default mode) captured in the same way; tokens/s = B / step time. The same step run
    back to back without a graph ("step without graph") is what an eager loop or a compiled step
    outside CUDA graphs pays, host time included.
    Not mode="reduce-overhead": its CUDA-graph trees cost host time on every call, which for the
    quantized models exceeded the GPU time (H100 host, any4 Llama-3-8B: 5.5 ms of Python per call,
    against 5.3 ms measured per step), so the numbers measured the host, and varied with what else
    the process had compiled (127 to 189 tok/s for the same any4 model).
The whole static cache is attended each step, so the step cost does not depend on the position.
Also: bytes held by the linear weights, and peak GPU memory, which INCLUDES the resident bf16 model
(about 15 GiB for Llama-3-8B: it is kept as the source of the quantized copies), so the memory
comparison is the "linear weights" column. Writes generate-<gpu>[-compiled].{json,md}.
"""

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_kernels import result_meta

from any4ao import Any4Tensor, Any4WeightOnlyConfig, quantize_model
from any4ao.kernels import selector

CONFIGS = {
    "llama3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
}
PROMPT, NEW = 512, 128


def build(name, layers):
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(CONFIGS[name])
    if layers:
        kwargs["num_hidden_layers"] = layers
    config = LlamaConfig(**kwargs, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(config).eval()
        torch.set_default_dtype(torch.float32)
    return model, config


def linear_weight_bytes(model):
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"):
            w = m.weight
            if isinstance(w, Any4Tensor):
                total += w.storage_bytes()
            elif hasattr(w, "qdata"):  # torchao int4: packed data + scale/zero
                total += sum(
                    getattr(w, a).numel() * getattr(w, a).element_size()
                    for a in getattr(w, "tensor_data_names", ["qdata"])
                    if getattr(w, a, None) is not None
                )
            else:
                total += w.numel() * w.element_size()
    return total


def time_cuda(fn, reps):
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.no_grad()
def measure(model, config, batch, compiled=False):
    from transformers import StaticCache

    cache = StaticCache(config=config, max_cache_len=PROMPT + NEW)  # batch size is taken on first use
    prompt = torch.randint(0, config.vocab_size, (batch, PROMPT), device="cuda")
    positions = torch.arange(PROMPT, device="cuda")

    def prefill():
        cache.reset()
        model(input_ids=prompt, past_key_values=cache, cache_position=positions, use_cache=True)

    prefill()
    ttft_ms = time_cuda(prefill, 3)
    token = torch.randint(0, config.vocab_size, (batch, 1), device="cuda")
    pos = torch.tensor([PROMPT + NEW - 1], device="cuda")

    def step():
        return model(input_ids=token, past_key_values=cache, cache_position=pos, use_cache=True).logits

    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(step, fullgraph=True)
    else:
        fn = step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    # Without a graph, back-to-back steps run at the host's pace: this is what an eager loop (or a
    # compiled step outside CUDA graphs) pays, Python and kernel launches included.
    host_ms = time_cuda(lambda: [fn() for _ in range(10)], 5) / 10
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    step_ms = time_cuda(lambda: [graph.replay() for _ in range(10)], 5) / 10
    graph.reset()
    return ttft_ms, step_ms, host_ms


def set_ws_rules(gpu: str, spec: str, shipped: dict) -> None:
    """selector.WS_RULES: for this GPU the rules "min_m:max_m:min_n:block_m:block_n:stages,..." of
    `spec`, or (empty spec) the rules any4ao ships (`shipped`, a copy taken at start)."""
    selector.WS_RULES.clear()
    if spec:
        selector.WS_RULES[gpu] = tuple(selector.WsRule(*(int(v) for v in r.split(":"))) for r in spec.split(","))
    else:
        selector.WS_RULES.update(shipped)
    selector.ws_config.cache_clear()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="llama3-8b", choices=sorted(CONFIGS))
    p.add_argument("--layers", type=int, help="override the layer count (state it when quoting results)")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--methods", default="bf16,torchao-int4,any4")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--compile", action="store_true", help="decode step through torch.compile, then a CUDA graph")
    p.add_argument(
        "--ws-rules",
        default="",
        help="min_m:max_m:min_n:block_m:block_n:stages,... : selector.WS_RULES for this GPU while the method "
        "'any4-ws' runs (any4 with the warp-specialised GEMM where a rule matches); the other methods keep "
        "the shipped rules",
    )
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    gpu = torch.cuda.get_device_name()
    shipped_ws_rules = dict(selector.WS_RULES)
    base, config = build(args.config, args.layers)
    rows = []
    for method in args.methods.split(","):
        gc.collect()
        torch.cuda.empty_cache()
        model = base if method == "bf16" else copy.deepcopy(base)
        start = time.perf_counter()
        set_ws_rules(gpu, args.ws_rules if method == "any4-ws" else "", shipped_ws_rules)
        if method in ("any4", "any4-ws"):
            quantize_model(
                model, Any4WeightOnlyConfig(group_size=128), progress=False, calibration="none"
            )  # speed only
        elif method == "torchao-int4":
            from torchao.quantization import Int4WeightOnlyConfig, quantize_

            quantize_(
                model,
                Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"),
                filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and not fqn.endswith("lm_head"),
            )
        torch.cuda.synchronize()
        quant_s = time.perf_counter() - start
        weight_bytes = linear_weight_bytes(model)
        for batch in batches:
            torch.cuda.reset_peak_memory_stats()
            try:
                ttft_ms, step_ms, host_ms = measure(model, config, batch, args.compile)
                row = dict(
                    method=method,
                    batch=batch,
                    ttft_ms=ttft_ms,
                    decode_step_ms=step_ms,
                    decode_tokens_per_s=batch * 1000 / step_ms,
                    step_without_graph_ms=host_ms,
                )
            except Exception as e:  # reported, not fatal: the other methods still run
                row = dict(method=method, batch=batch, error=repr(e)[:300])
            row.update(
                linear_weight_bytes=weight_bytes, quantize_s=quant_s, peak_gib=torch.cuda.max_memory_allocated() / 2**30
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
        if model is not base:
            del model
    bf16 = {r["batch"]: r for r in rows if r["method"] == "bf16" and "error" not in r}
    lines = [
        f"`{' '.join(sys.argv)}`",
        "",
        f"{gpu}, torch {torch.__version__}, triton {__import__('triton').__version__}; {args.config} config, "
        f"{config.num_hidden_layers} layers, random bf16 weights; prompt {PROMPT}, decode at KV length {PROMPT + NEW}; "
        f"decode step {'torch.compile(fullgraph) in a CUDA graph' if args.compile else 'eager kernels in a CUDA graph'}",
        "",
        "peak GiB includes the resident bf16 model (kept as the source of the quantized copies); "
        "compare memory with the linear-weights column.",
        "",
        "| method | batch | TTFT ms | decode step ms | tokens/s | vs bf16 | step without graph ms "
        "| linear weights GiB | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['batch']} | error: {r['error'][:80]} | | | | | | |")
            continue
        ref = bf16.get(r["batch"])
        speed = f"{r['decode_tokens_per_s'] / ref['decode_tokens_per_s']:.2f}x" if ref else "-"
        lines.append(
            f"| {r['method']} | {r['batch']} | {r['ttft_ms']:.1f} | {r['decode_step_ms']:.2f} | "
            f"{r['decode_tokens_per_s']:.0f} | {speed} | {r['step_without_graph_ms']:.2f} | "
            f"{r['linear_weight_bytes'] / 2**30:.2f} | {r['peak_gib']:.1f} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"generate-{gpu.replace(' ', '-')}" + ("-compiled" if args.compile else "")
    meta = result_meta(
        config=args.config,
        layers=config.num_hidden_layers,
        weights="random",
        ws_rules=args.ws_rules,
        prompt=PROMPT,
        new_tokens=NEW,
        decode_step="torch.compile(fullgraph) in a CUDA graph" if args.compile else "eager kernels in a CUDA graph",
    )
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / f"{stem}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
