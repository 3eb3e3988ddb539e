"""Multi-GPU checks and timings for FSDP2 / tensor parallel / QLoRA on any4 weights.

    torchrun --nproc-per-node 2 benchmarks/check_distributed.py [--layers 8] [--out DIR]

1. Correctness, on the GPUs with the Triton kernels (bf16): the checks of tests/distributed_checks.py
   (FSDP2 forward = unsharded forward with uneven row shards, all-gather bytes of the packed form,
   Megatron TP of a Llama block = unsharded, peft LoRA on a sharded any4 base trains).
2. Timing: one QLoRA training step (forward + backward + AdamW on the adapters) of a Llama-3-8B-shaped
   model with --layers decoder layers and RANDOM weights, FSDP2 over all ranks, batch 2 x 1024,
   with the frozen base in bf16 vs any4 (group 128): median step time, bytes all-gathered per
   step, peak memory per GPU.
Rank 0 prints a table and writes distributed-<gpu>-x<world>.{json,md}.
(NCCL's NVLink multicast stays off: NCCL_NVLS_ENABLE=0 as the device machines require.)
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import any4ao.testing.distributed_checks as checks  # noqa: E402


def qlora_step_time(mesh, base: str, layers: int, record, steps=6):
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from any4ao import Any4WeightOnlyConfig, quantize_model

    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    if base == "any4":
        # each rank quantizes its own copy (fast on the GPU); the values only matter for speed here
        quantize_model(model, Any4WeightOnlyConfig(group_size=128, kmeans_iterations=10), progress=False)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 32000, (2, 1024), device="cuda")
    times, gathered = [], []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        del record[:]
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
        gathered.append(sum(record))
    result = {
        "base": base,
        "layers": layers,
        "step_ms": statistics.median(times[2:]),
        "loss": loss.item(),
        "all_gather_bytes_per_step": gathered[-1],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    del model, optimizer
    torch.cuda.empty_cache()
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cuda", (world,))
    record = checks.gathered_bytes_recorder()
    bf16 = torch.bfloat16
    results = {
        "fsdp_forward": checks.fsdp_forward_matches_unsharded(mesh, "cuda", bf16),
        "tensor_parallel": checks.tensor_parallel_matches_unsharded(mesh, "cuda", bf16),
        "all_gather_volume": checks.fsdp_all_gather_volume(mesh, "cuda", record),
        "qlora_tiny": checks.qlora_with_fsdp(mesh, "cuda", dtype=torch.float32),
        "step": [qlora_step_time(mesh, base, args.layers, record) for base in ("bf16", "any4")],
    }
    if rank == 0:
        v, f, tp = results["all_gather_volume"], results["fsdp_forward"], results["tensor_parallel"]
        ok = {
            "FSDP2 forward == unsharded (bit-exact)": f["max_diff_first"] == 0 and f["max_diff_second"] == 0,
            "TP forward ~= unsharded (partial sums reordered)": tp["max_diff"] <= 2e-2 * tp["scale"],
            "all-gather bytes == packed parts": v["gathered_bytes"] == v["expected_bytes"] and v["max_diff"] == 0,
            "QLoRA loss decreases on sharded any4": results["qlora_tiny"]["losses"][-1]
            < results["qlora_tiny"]["losses"][0],
        }
        gpu = torch.cuda.get_device_name()
        lines = [
            f"`torchrun --nproc-per-node {world} {' '.join(sys.argv)}`",
            "",
            f"{world} x {gpu}, torch {torch.__version__}, triton {__import__('triton').__version__}",
            "",
            "| check | result |",
            "|---|---|",
        ]
        lines += [f"| {k} | {'pass' if passed else 'FAIL'} |" for k, passed in ok.items()]
        lines += [
            f"| all-gather bits/weight (97 x 4096 any4 bf16, g128) | {8 * v['gathered_bytes'] / v['weights']:.3f} |",
            f"| TP max abs diff / max abs logit | {tp['max_diff']:.2e} / {tp['scale']:.2e} |",
            "",
            f"QLoRA step (LoRA r=16 on all linears, batch 2 x 1024, Llama-3-8B shapes, {args.layers} layers, "
            "random weights, FSDP2 over all GPUs):",
            "",
            "| frozen base | step ms (median) | all-gather GB/step | peak GiB/GPU |",
            "|---|---|---|---|",
        ]
        for s in results["step"]:
            lines.append(
                f"| {s['base']} | {s['step_ms']:.1f} | {s['all_gather_bytes_per_step'] / 1e9:.2f} | {s['peak_gib']:.1f} |"
            )
        table = "\n".join(lines)
        print(table, flush=True)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"distributed-{gpu.replace(' ', '-')}-x{world}"
        meta = {"device": gpu, "world": world, "torch": torch.__version__, "command": " ".join(sys.argv)}
        (out / f"{stem}.json").write_text(
            json.dumps({"meta": meta, "checks": ok, "results": results}, indent=2, default=str)
        )
        (out / f"{stem}.md").write_text(table + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
