"""Smoke test of an installed wheel, run from outside the repository (so `import any4ao` cannot
find the source tree): quantize, forward, save and load, the CLI's help. Exits non-zero on failure."""

import os
import subprocess
import sys
import tempfile

import torch
from torch import nn

import any4ao
from any4ao.kernels import selector

assert "site-packages" in any4ao.__file__, f"any4ao imported from {any4ao.__file__}, not the installed wheel"
assert selector.FUSED_MAX_M > 0  # the kernels/ folder made it into the wheel as any4ao.kernels

model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64))
x = torch.randn(4, 256)
reference = model(x)
any4ao.quantize_model(
    model, any4ao.Any4WeightOnlyConfig(group_size=64), filter_fn=lambda m, n: isinstance(m, nn.Linear)
)
assert isinstance(model[0].weight, any4ao.Any4Tensor)
y = model(x)
rel = ((y - reference).norm() / reference.norm()).item()
assert rel < 0.1, rel
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "model.safetensors")
    any4ao.save_quantized(model, path)
    fresh = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64))
    any4ao.load_quantized(path, fresh)
    assert torch.equal(fresh(x), y)
help_text = subprocess.run([sys.executable, "-m", "any4ao", "eval", "--help"], capture_output=True, text=True)
assert help_text.returncode == 0 and "--group-size" in help_text.stdout, help_text.stderr[-2000:]
print(
    f"wheel smoke test passed: any4ao {any4ao.__version__} from {os.path.dirname(any4ao.__file__)}, rel err {rel:.3f}"
)
