"""What each rank runs for tests/test_distributed.py (and, on GPUs, benchmarks/check_distributed.py).

Every check returns a dict of plain numbers, so the parent process (pytest) asserts on them;
a check runs on all ranks in the same order, as collectives require.
"""

import torch
import torch.distributed as dist
from torch import nn


def gathered_bytes_recorder():
    """Counts the bytes every FSDP2 all-gather writes into its output buffer (all ranks' inputs
    together), by wrapping FSDP2's default all-gather. None if this torch has no such hook."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather
    except ImportError:
        return None
    record = []
    original = DefaultAllGather.__call__

    def counting(self, output_tensor, input_tensor, group, async_op=False):
        record.append(output_tensor.numel() * output_tensor.element_size())
        return original(self, output_tensor, input_tensor, group, async_op)

    DefaultAllGather.__call__ = counting
    return record


def _quantized_tiny_llama(hidden, intermediate, device, dtype):
    """Quantized on the CPU, then moved: CUDA's scatter_add sums in a non-deterministic order, so
    k-means run on each GPU could give ranks slightly different LUTs; the CPU result is the same
    on every rank, which the equality checks (and src_data_rank=None in TP) rely on."""
    from any4ao import Any4WeightOnlyConfig, quantize_model
    from any4ao.testing.tiny_models import tiny_llama

    model = tiny_llama(hidden=hidden, intermediate=intermediate)
    quantize_model(model, Any4WeightOnlyConfig(group_size=32, kmeans_iterations=2), progress=False)
    return nn.Module.to(model, device=device, dtype=dtype)


def fsdp_forward_matches_unsharded(mesh, device, dtype=torch.float32) -> dict:
    """Uneven rows: gate/up have 161 rows, so 2 ranks hold 81 and 80."""
    from torch.distributed.fsdp import fully_shard

    model = _quantized_tiny_llama(64, 161, device, dtype)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        reference = model(ids).logits
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        first, second = model(ids).logits, model(ids).logits  # second: all-gather into reused buffers
    local = model.model.layers[0].mlp.gate_proj.weight.to_local()
    return {
        "local_rows": local.shape[0],
        "local_type": type(local).__name__,
        "max_diff_first": (first - reference).abs().max().item(),
        "max_diff_second": (second - reference).abs().max().item(),
    }


def fsdp_mixed_precision_matches_a_cast_model(mesh, device) -> dict:
    """MixedPrecisionPolicy(param_dtype=bf16) on fp32 any4 weights: post_all_gather casts LUT,
    scales and zeros (the codes stay uint8), so the result must equal the same model cast to bf16,
    on the first forward and on the second (which re-casts into the buffers of the first)."""
    import copy

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = _quantized_tiny_llama(64, 161, device, torch.float32)
    cast = nn.Module.to(copy.deepcopy(model), dtype=torch.bfloat16)
    for (_, kept), (_, buf) in zip(model.named_buffers(), cast.named_buffers()):
        buf.data = kept.data.clone()  # FSDP casts parameters only; rotary inv_freq stays fp32
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0)).to(device)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.bfloat16)
    with torch.no_grad():
        reference = cast(ids).logits
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        first, second = model(ids).logits, model(ids).logits
    return {
        "dtype": str(first.dtype),
        "max_diff_first": (first.float() - reference.float()).abs().max().item(),
        "max_diff_second": (second.float() - reference.float()).abs().max().item(),
    }


def fsdp_all_gather_volume(mesh, device, record) -> dict:
    """One bf16 any4 linear (97 x 4096, group 128), sharded: bytes gathered per weight."""
    from torch.distributed.fsdp import fully_shard

    from any4ao import Any4WeightOnlyConfig, quantize_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4096, 97, bias=False)).to(torch.bfloat16)
    quantize_model(model, Any4WeightOnlyConfig(group_size=128, kmeans_iterations=2), progress=False)
    model = model.to(device)  # quantized on the CPU: identical on every rank (see above)
    full = model[0].weight
    per_row = full.storage_bytes() // full.shape[0]
    x = torch.randn(3, 4096, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        reference = model(x)
        fully_shard(model, mesh=mesh)
        del record[:]
        out = model(x)
    world = mesh.size()
    padded_rows = -(-97 // world)
    return {
        "gathered_bytes": sum(record),
        "all_gathers": len(record),
        "expected_bytes": world * padded_rows * per_row,
        "weights": 97 * 4096,
        "bf16_bytes": 97 * 4096 * 2,
        "max_diff": (out - reference).abs().max().item(),
    }


def qlora_with_fsdp(mesh, device, steps=12, dtype=torch.float32) -> dict:
    """peft LoRA adapters on a sharded any4 base: adapters train, the base does not change."""
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import fully_shard

    from any4ao import Any4Tensor

    model = _quantized_tiny_llama(64, 160, device, dtype)
    torch.manual_seed(1)  # same adapters on every rank
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    base = model.base_model.model.model
    before = base.layers[0].mlp.down_proj.base_layer.weight.qdata.clone()
    for layer in base.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=3e-2)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 128, (4, 24), generator=g).to(device)  # same batch on every rank
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    weight = base.layers[0].mlp.down_proj.base_layer.weight
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    # the full base weight must be unchanged: compare this rank's rows with the saved copy
    rows = local.shape[0]
    start = dist.get_rank() * -(-before.shape[0] // mesh.size())
    return {
        "losses": losses,
        "trainable": sum(p.numel() for p in trainable),
        "base_is_any4": isinstance(local, Any4Tensor),
        "base_unchanged": bool(torch.equal(local.qdata, before[start : start + rows])),
    }


def tensor_parallel_matches_unsharded(mesh, device, dtype=torch.float32) -> dict:
    """Megatron-style TP of every Llama block: q/k/v and gate/up column-wise (rows of W), o and
    down row-wise (in_features, whole groups per rank). The weights are quantized identically on
    every rank (k-means is deterministic), so src_data_rank=None: each rank keeps its slice of its
    own copy, no scatter of the packed parts is needed."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = _quantized_tiny_llama(64, 128, device, dtype)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0)).to(device)
    plan = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }
    with torch.no_grad():
        reference = model(ids).logits
        for layer in model.model.layers:
            parallelize_module(layer, mesh, plan, src_data_rank=None)
        out = model(ids).logits
    layer = model.model.layers[0]
    return {
        "q_local": tuple(layer.self_attn.q_proj.weight.to_local().shape),
        "down_local": tuple(layer.mlp.down_proj.weight.to_local().shape),
        "local_type": type(layer.mlp.down_proj.weight.to_local()).__name__,
        "max_diff": (out - reference).abs().max().item(),
        "scale": reference.abs().max().item(),
    }
