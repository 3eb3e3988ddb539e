"""Tutorial: QLoRA-style fine-tuning on any4 weights, sharded with FSDP2.

The base model is quantized with any4 (frozen Any4Tensor weights), peft adds LoRA adapters,
and FSDP2's fully_shard shards every decoder layer across ranks: each rank keeps a row slice of
the packed any4 weights and all-gathers the packed form (about 4.3 bits/weight) just in time for
each layer's forward and backward. Only the adapters get gradients and optimizer state.

    python tutorials/qlora_fsdp.py --tiny                 # 2 CPU ranks (gloo), tiny random Llama (CI)
    python tutorials/qlora_fsdp.py --world 2 --steps 20   # SmolLM2-135M on WikiText-2 valid, 2 CPU ranks
    torchrun --nproc-per-node 2 tutorials/qlora_fsdp.py   # GPUs (nccl), one process per GPU
"""

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def build(tiny: bool, device):
    if tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=161,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        model = LlamaForCausalLM(cfg).to(device)
        # a learnable toy task: arithmetic sequences (next token = previous + step, mod vocab)
        starts, steps = torch.arange(4)[:, None] * 11, torch.tensor([1, 3, 5, 7])[:, None]
        batches = [((starts + steps * torch.arange(32)) % 256).to(device)]
        return model, batches
    from any4ao.evaluation import load_text
    from any4ao.models import load_causal_lm

    model, tokenizer, _ = load_causal_lm(dtype=torch.float32)
    ids = tokenizer(load_text("wikitext-2-valid")[:200_000], return_tensors="pt").input_ids[0]
    seq = 128
    chunks = ids[: (len(ids) // seq) * seq].view(-1, seq)[:64]
    return model.to(device), [chunks[i : i + 4].to(device) for i in range(0, len(chunks), 4)]


def train(rank: int, world: int, args) -> list:
    from peft import LoraConfig, get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from any4ao import Any4WeightOnlyConfig, quantize_model

    device = (
        torch.device("cuda", rank)
        if torch.cuda.is_available() and dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    model, batches = build(args.tiny, device)
    # 1. Quantize: the same deterministic k-means on every rank, so every rank holds the same base.
    quantize_model(model, Any4WeightOnlyConfig(group_size=32 if args.tiny else 64), progress=rank == 0)
    # 2. LoRA adapters (the only trainable parameters); same seed everywhere -> same initial adapters.
    torch.manual_seed(0)
    model = get_peft_model(
        model,
        LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
        ),
    )
    # 3. FSDP2: shard each decoder layer, then the root (embeddings, head).
    mesh = init_device_mesh(device.type, (world,))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    losses = []
    for step in range(args.steps):
        ids = batches[(step * world + rank) % len(batches)]  # each rank its own slice of the data
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()  # FSDP2 reduce-scatters the adapter gradients
        optimizer.step()
        optimizer.zero_grad()
        reduced = loss.detach().clone()
        dist.all_reduce(reduced)
        losses.append(reduced.item() / world)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  mean loss over ranks {losses[-1]:.4f}", flush=True)
    return losses


def _spawned(rank, world, init_file, args, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        losses = train(rank, world, args)
        if rank == 0:
            torch.save(losses, out)
    finally:
        dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--world", type=int, default=2, help="CPU ranks to spawn (ignored under torchrun)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--lr", type=float, default=1e-2)
    args = p.parse_args(argv)
    if "RANK" in os.environ:  # torchrun: one process per GPU
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        torch.cuda.set_device(dist.get_rank()) if torch.cuda.is_available() else None
        losses = train(dist.get_rank(), dist.get_world_size(), args)
        dist.destroy_process_group()
        return losses
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "losses.pt")
        mp.spawn(_spawned, args=(args.world, os.path.join(tmp, "init"), args, out), nprocs=args.world, join=True)
        return torch.load(out)


if __name__ == "__main__":
    main()
