"""QLoRA-style fine-tuning on a frozen any4 base (single process; the FSDP2 variant is in
test_distributed.py)."""

import pytest
import torch
from tiny_models import tiny_llama
from torch import nn

from any4ao import Any4Tensor, Any4WeightOnlyConfig, quantize_model


def test_gradient_reaches_the_input_through_a_frozen_any4_linear():
    layer = nn.Linear(96, 40, bias=True)
    quantize_model(
        layer, Any4WeightOnlyConfig(group_size=32, kmeans_iterations=2), filter_fn=lambda m, n: True, progress=False
    )
    w = layer.weight
    assert isinstance(w, Any4Tensor) and not w.requires_grad
    x = torch.randn(5, 96, dtype=torch.float64).float().requires_grad_(True)
    grad_out = torch.randn(5, 40)
    layer(x).backward(grad_out)
    torch.testing.assert_close(x.grad, grad_out @ w.dequantize(torch.float32), rtol=1e-5, atol=1e-5)
    assert layer.bias.grad is not None and w.grad is None


def test_peft_lora_adapters_train_and_the_any4_base_stays_frozen():
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    quantize_model(model, Any4WeightOnlyConfig(group_size=32, kmeans_iterations=2), progress=False)
    torch.manual_seed(0)
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    base = model.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight
    before = base.qdata.clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(not isinstance(p, Any4Tensor) for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=3e-2)
    ids = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(12):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert torch.equal(base.qdata, before)
