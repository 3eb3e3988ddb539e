"""Triton kernels under TRITON_INTERPRET=1 on CPU tensors, against a float64 reference.

Every output buffer the launchers allocate is pre-filled with NaN, so an element a kernel fails
to write makes the comparison fail."""

import pytest
import torch
from helpers import reference_dequantize
from hypothesis import given, settings
from hypothesis import strategies as st

from any4ao import Any4Tensor
from any4ao.kernels import launch, ops, selector  # noqa: F401  (ops registers torch.ops.any4ao.*)
from any4ao.kernels.launch import lut_dequantize, lut_mma
from any4ao.kernels.selector import MmaConfig, Rule, choose, mma_applies, mma_config, permute_dequantize_applies

# bf16 / fp16 operands with fp32 accumulation, one final rounding of the output.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(
        launch, "_empty", lambda shape, device, dtype: torch.full(shape, float("nan"), device=device, dtype=dtype)
    )


def _problem(m, n, k, group_size, nbits, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    t = Any4Tensor.from_hp(w, codebook=f"any{nbits}", group_size=group_size, kmeans_iterations=3)
    x = torch.randn(m, k, generator=g).to(dtype)
    w64 = reference_dequantize(t.codes(), t.lut, t.scale, t.zero_point, group_size)
    ref = x.double() @ w64.t()
    ref.magnitude = x.double().abs() @ w64.abs().t()  # scale of the rounding error of each dot product
    return t, x, ref


def _rel(out, ref):
    """Error relative to sum_k |x_k W_nk| (not |ref|, which cancellation can make arbitrarily small)."""
    assert not torch.isnan(out).any(), "unwritten (NaN-poisoned) or NaN output"
    return ((out.double() - ref).norm() / ref.magnitude.norm()).item()


def _args(t):
    return t.qdata, t.lut, t.scale, t.zero_point


@settings(max_examples=10)  # each example runs the byte-permute and mma emulation in the interpreter: slow
@given(
    m=st.integers(1, 72),
    n_tiles=st.sampled_from([1, 2, 4, 8]),
    spread=st.booleans(),
    n=st.integers(1, 70),
    k_groups=st.integers(1, 3),
    group_size=st.sampled_from([32, 64, 96, 128, 256]),
    nbits=st.sampled_from([3, 4]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    row_tiles=st.sampled_from([1, 2]),
    k_warps=st.sampled_from([1, 2, 4]),
    split_k=st.integers(1, 2),
    prefetch=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_mma_kernel_matches_float64(
    m, n_tiles, spread, n, k_groups, group_size, nbits, dtype, row_tiles, k_warps, split_k, prefetch, seed
):
    """lut_mma itself: 1, 2, 4 or 8 n-tiles per program, one or two 16-row weight tiles per warp,
    several programs along M, ragged N and M, 1-4 code words per lane and step, 1-8 steps per
    group, K warps that get no group, split K, prefetch 1 or 2 steps; the interpreter assembles
    the mma fragments into matrices, so the fragment bookkeeping is what is tested here."""
    k = k_groups * group_size
    t, x, ref = _problem(m, n, k, group_size, nbits, dtype, seed)
    assert mma_applies(x, *_args(t), nbits, group_size)
    row_tiles = 1 if n_tiles == 8 else row_tiles  # two row tiles take at most 4 n-tiles
    cfg = MmaConfig(8 * n_tiles, row_tiles, k_warps, prefetch, spread, split_k)
    out = lut_mma(x, *_args(t), nbits, group_size, cfg)
    assert out.shape == (m, n) and out.dtype == dtype
    assert _rel(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("prefetch", [1, 2])
@pytest.mark.parametrize("even", [True, False])
def test_mma_prefetch_and_even_splits(prefetch, even):
    """Codes loaded 1 or 2 steps ahead, with every warp getting the same number of groups (the
    kernel drops its load predicates) or not (6 groups over 2 splits x 2 K warps: a warp of each
    split has a step outside it, which must add nothing), on ragged N and M (rows clamped, not
    masked: unstored rows must not leak into stored ones)."""
    m, n, group_size = 11, 40, 32
    k = (8 if even else 6) * group_size
    spread, row_tiles = [(False, 2), (True, 1)][(prefetch + even) % 2]
    t, x, ref = _problem(m, n, k, group_size, 4, torch.bfloat16, seed=prefetch + 3 * even + 7 * row_tiles)
    out = lut_mma(x, *_args(t), 4, group_size, MmaConfig(16, row_tiles, 2, prefetch, spread, split_k=2))
    assert _rel(out, ref) < TOLERANCE[torch.bfloat16], (spread, row_tiles)


@pytest.mark.parametrize(
    "cfg",
    [
        MmaConfig(8, 1, 1, prefetch=3),
        MmaConfig(8, 1, 1, prefetch=0),
        MmaConfig(24, 1, 1, 2),  # 3 n-tiles
        MmaConfig(64, 2, 1, 2),  # two row tiles take at most 4 n-tiles
        MmaConfig(8, 3, 1, 2),
        MmaConfig(8, 1, 3, 2),  # K warps not a power of two
        MmaConfig(8, 1, 1, 2, split_k=0),
    ],
)
def test_mma_rejects_configs_it_cannot_run(cfg):
    t, x, _ = _problem(4, 32, 64, 32, 4, torch.bfloat16, seed=1)
    with pytest.raises(ValueError, match="lut_mma takes"):
        lut_mma(x, *_args(t), 4, 32, cfg)


@given(
    n=st.integers(1, 70),
    k=st.integers(16, 300),
    group_size=st.sampled_from([16, 32, 64]),
    nbits=st.sampled_from([2, 3, 4]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    permute=st.sampled_from([None, False, True]),
    seed=st.integers(0, 2**16),
)
def test_dequantize_kernel_matches_formula(n, k, group_size, nbits, dtype, permute, seed):
    t, _, _ = _problem(1, n, k, group_size, nbits, dtype, seed)
    permute = permute and permute_dequantize_applies(t.qdata, t.lut, nbits, k)  # None: the launcher decides
    out = lut_dequantize(*_args(t), nbits, group_size, k, dtype, permute=permute)
    ref = t.dequantize(torch.float64)
    assert not torch.isnan(out).any()
    # fp32 arithmetic then one conversion to dtype. One full ulp, not half: the triton 3.9
    # interpreter converts fp32 -> bf16 by truncation, not round-to-nearest as the GPU does. Below
    # the dtype's normal range the ulp is the subnormal step (an fp16 output of 4.3e-6 is a multiple
    # of 2^-24), which the relative term alone does not cover.
    terms = reference_dequantize(t.codes(), t.lut.abs(), t.scale.abs(), t.zero_point.abs(), group_size)
    ulp = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float32: 2**-23}[dtype]
    step = torch.finfo(dtype).smallest_normal * ulp  # the subnormal spacing
    assert torch.all((out.double() - ref).abs() <= 2**-22 * terms + torch.clamp(ulp * ref.abs(), min=step))


@pytest.mark.parametrize(
    "m, nbits, group, dtype, path",
    [
        (1, 4, 32, torch.bfloat16, "mma"),
        (40, 3, 32, torch.float16, "mma"),
        (64, 4, 32, torch.bfloat16, "mma"),
        (65, 4, 32, torch.bfloat16, "gemm"),  # above FUSED_MAX_M
        (130, 3, 48, torch.float16, "gemm"),  # groups of 48: 16-column K steps
        (65, 2, 32, torch.bfloat16, "dequantize"),  # 2-bit codes: no register lookup
        (70, 4, 32, torch.float32, "dequantize"),  # fp32 x: no 16-bit tensor-core operands
        (3, 2, 32, torch.bfloat16, "dequantize"),
        (3, 4, 16, torch.float16, "dequantize"),  # groups not a multiple of 32
        (2, 4, 48, torch.bfloat16, "dequantize"),
    ],
)
def test_custom_op_takes_the_selected_path(monkeypatch, m, nbits, group, dtype, path):
    """torch.ops.any4ao.lut_linear on each of its three paths, against float64, and the path is the
    selector's (under the interpreter every M above FUSED_MAX_M that lut_gemm can read takes it)."""
    t, x, ref = _problem(m, 48, 96, group, nbits, dtype, seed=m)
    calls = []
    for name, tag in (("lut_mma", "mma"), ("lut_gemm", "gemm"), ("dequantize_then_mm", "dequantize")):
        real = getattr(launch, name)
        monkeypatch.setattr(ops, name, lambda *a, real=real, tag=tag: (calls.append(tag), real(*a))[1])
    out = torch.ops.any4ao.lut_linear(x, *_args(t), nbits, group)
    assert calls == [path]
    assert out.dtype == dtype and _rel(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("case", ["x-dtype", "x-misaligned", "scale-fp32", "codes-misaligned"])
def test_mma_does_not_apply_to_layouts_it_cannot_read(case):
    """lut_mma needs x, scale and zero point in the LUT's dtype (it reads scales as 16-bit bits)
    and x rows 16-byte and code rows 4-byte aligned, also where the storage offset looks fine
    (memory from torch.frombuffer or DLPack); the selector then sends the call to dequantize + mm."""
    dtype = torch.bfloat16
    t, x, ref = _problem(3, 24, 64, 32, 4, dtype, seed=5)
    qdata, lut, scale, zero_point = _args(t)
    if case == "x-dtype":
        x = x.half()
    if case == "x-misaligned":
        x = torch.cat([torch.zeros(1, dtype=dtype), x.flatten()])[1:].view(x.shape)  # data_ptr % 16 == 2
    if case == "scale-fp32":
        scale, zero_point = scale.float(), zero_point.float()
    if case == "codes-misaligned":
        raw = bytearray(qdata.numel() + 8)
        base = torch.frombuffer(raw, dtype=torch.uint8).data_ptr()
        skew = next(o for o in range(1, 4) if (base + o) % 4)
        qdata = torch.frombuffer(raw, dtype=torch.uint8, count=qdata.numel(), offset=skew).view(qdata.shape)
        qdata.copy_(t.qdata)
        assert qdata.storage_offset() == 0 and qdata.data_ptr() % 4
    assert mma_applies(x.to(dtype).clone(), *_args(t), 4, 32)  # the same values, freshly allocated
    assert not mma_applies(x, qdata, lut, scale, zero_point, 4, 32)
    assert choose(x, qdata, lut, scale, zero_point, 4, 32) is None


def test_selector_reproduces_the_h100_sweep_winners():
    """The H100 table (fitted to sweep-H100-v14-prefetch.json) on an H100's 132 SMs; small K caps
    the K warps by the groups (a power of two)."""

    def pick(m, n, k, group_size=128):
        cfg = mma_config(m, n, k, group_size, CPU)  # the interpreter counts as an H100
        return cfg.block_m, cfg.row_tiles, cfg.k_warps, cfg.spread, cfg.prefetch

    assert pick(1, 4096, 4096) == (8, 1, 8, False, 2)  # (block_m, row tiles, K warps, spread, prefetch)
    assert pick(8, 14336, 4096) == (8, 1, 4, False, 1)
    assert pick(1, 8192, 8192) == (8, 1, 4, False, 1)
    assert pick(1, 28672, 4096) == (8, 1, 4, False, 1)
    assert pick(16, 4096, 14336) == (16, 1, 8, False, 2)
    assert pick(16, 28672, 4096) == (16, 2, 2, False, 1)
    assert pick(16, 1024, 4096) == (16, 1, 8, False, 2)
    assert pick(32, 6144, 4096) == (32, 2, 4, False, 2)
    assert pick(32, 28672, 4096) == (32, 2, 1, False, 2)
    assert pick(64, 4096, 14336) == (32, 2, 4, False, 2)
    assert pick(64, 1024, 4096) == (16, 1, 4, True, 2)
    assert pick(1, 64, 384)[2] == 2  # three groups: two K warps
    assert pick(40, 64, 128)[2] == 1  # one group: one K warp
    assert pick(16, 64, 8192)[2] == 8
    assert mma_config(selector.FUSED_MAX_M + 1, 4096, 4096, 128, CPU) is None


def test_selector_tables_cover_every_shape_and_unknown_gpus_scale_by_sms(monkeypatch):
    """Every table ends in a catch-all rule per M bucket, so any (M <= FUSED_MAX_M, N) finds one;
    an unknown GPU gets the H100 rules with N thresholds scaled by its SM count; pre-sm_80 GPUs
    (no bf16 mma.sync) get none."""
    for name, (rules, _) in selector.RULES.items():
        for m in range(1, selector.FUSED_MAX_M + 1):
            assert any(m <= r.max_m and r.min_n == 0 for r in rules), (name, m)
        assert all(isinstance(r, Rule) for r in rules)
    monkeypatch.setattr(selector, "_device_facts", lambda device: ("Some GPU", 66, (9, 0)))
    rules, _ = selector._device_table("Some GPU", 66)
    assert rules[0].min_n == selector.RULES["H100"][0][0].min_n // 2
    assert mma_config(1, 4096, 4096, 128, CPU) is not None
    monkeypatch.setattr(selector, "_device_facts", lambda device: ("Old GPU", 80, (7, 5)))
    assert mma_config(1, 4096, 4096, 128, CPU) is None


def test_split_k_is_deterministic():
    t, x, _ = _problem(2, 40, 512, 64, 4, torch.bfloat16, seed=1)
    cfg = MmaConfig(8, 1, 2, 2, split_k=4)
    a = lut_mma(x, *_args(t), 4, 64, cfg)
    b = lut_mma(x, *_args(t), 4, 64, cfg)
    assert torch.equal(a, b)


def test_dequantize_kernel_lookup_paths_agree():
    """The register lookup (permute) and the gather load give the same fp32 weights."""
    t, _, _ = _problem(1, 37, 200, 32, 4, torch.bfloat16, seed=3)
    a = lut_dequantize(*_args(t), 4, 32, 200, torch.float32, permute=True)
    b = lut_dequantize(*_args(t), 4, 32, 200, torch.float32, permute=False)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, t.dequantize(torch.float32), rtol=1e-6, atol=1e-6)


@settings(max_examples=10)  # the Triton dequantize (byte-permute emulation) in the interpreter is slow
@given(m=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_lut_linear_backward_gives_grad_out_times_w(m, seed):
    """QLoRA path: gradient to x through the custom op (Triton dequantize in the backward) equals
    grad_out @ W in float64; nothing flows to the frozen packed parts."""
    t, x, _ = _problem(m, 40, 64, 16, 4, torch.float16, seed)
    x.requires_grad_(True)
    out = torch.ops.any4ao.lut_linear(x, *_args(t), 4, 16)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out.dtype)
    out.backward(grad_out)
    w64 = reference_dequantize(t.codes(), t.lut, t.scale, t.zero_point, 16)
    ref = grad_out.double() @ w64
    ref.magnitude = grad_out.double().abs() @ w64.abs()
    assert _rel(x.grad, ref) < TOLERANCE[torch.float16]


def test_selector_uses_the_h200_table_on_an_h200(monkeypatch):
    """The H200 rules differ from the H100's at M = 17..32 only (sweep-H200-v15-selector.json)."""
    monkeypatch.setattr(selector, "_device_facts", lambda device: ("NVIDIA H200", 132, (9, 0)))
    assert mma_config(32, 4096, 14336, 128, CPU) == MmaConfig(32, 2, 8, 2, False)
    assert mma_config(32, 1024, 4096, 128, CPU) == MmaConfig(16, 1, 8, 2, False)
    assert mma_config(1, 28672, 4096, 128, CPU) == MmaConfig(8, 1, 4, 1, False)  # as on the H100


def test_the_kernels_folder_does_not_shadow_the_pypi_package_of_that_name():
    """With the checkout's root first on sys.path (`python -m ...` run from it), `import kernels`
    reaches the PyPI package transformers imports (transformers >= 5.25 depends on it), or fails
    naming the folder where none is installed; never any4ao's own kernels/ folder."""
    import importlib.metadata
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    code = "import kernels; print(kernels.__file__)"  # python -c puts the working directory first
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert run.returncode != 0 and "any4ao's source folder" in run.stderr
    else:
        assert run.returncode == 0, run.stderr
        assert Path(run.stdout.strip()).resolve().parent != root / "kernels"


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_eager_linear_calls_the_op_body_directly_only_where_nothing_can_tell(monkeypatch):
    """F.linear on an Any4Tensor skips the dispatcher (host time) only in plain eager inference;
    with a gradient to record, a dispatch mode or the profiler it goes through
    torch.ops.any4ao.lut_linear. Same result either way."""
    import torch.nn.functional as F

    t, x, ref = _problem(5, 24, 64, 32, 4, torch.bfloat16, seed=3)
    monkeypatch.setattr(selector, "fused_linear_applies", lambda x, w: True)  # CPU: the interpreter kernels
    direct = []
    real = ops.lut_linear
    monkeypatch.setattr(ops, "lut_linear", lambda *a: (direct.append(1), real(*a))[1])
    with torch.no_grad():
        fast = F.linear(x, t)
    assert direct == [1] and _rel(fast, ref) < TOLERANCE[torch.bfloat16]
    with _OpLog() as log:
        seen = F.linear(x, t)
    assert direct == [1] and "any4ao.lut_linear.default" in log.ops
    assert torch.equal(seen, fast)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        F.linear(x, t)
    assert direct == [1] and any(e.name == "any4ao::lut_linear" for e in prof.events())
    xg = x.clone().requires_grad_(True)
    out = F.linear(xg, t)
    assert direct == [1] and out.grad_fn is not None and torch.equal(out.detach(), fast)
    out.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    with torch.no_grad():  # the check on the fast path still names the problem
        with pytest.raises(ValueError, match="in_features=64"):
            F.linear(torch.randn(5, 32, dtype=torch.bfloat16), t)


def test_fused_linear_under_transforms_tracing_and_autocast(monkeypatch):
    """Where the custom op cannot serve F.linear correctly, the dequantized weight does: forward-mode
    AD (the op has no jvp: the tangent was dropped), functorch transforms, autocast (its dtype).
    torch.jit.trace and lazily negated x go through the dispatcher (the direct call read the
    traced sizes as pointers, and a neg-bit view un-negated). A bias of another dtype is refused
    as F.linear refuses it (it promoted the output to float32)."""
    import torch.autograd.forward_ad as fwAD
    import torch.nn.functional as F

    t, x, _ = _problem(5, 24, 64, 32, 4, torch.bfloat16, seed=11)
    dense = t.dequantize(torch.bfloat16)
    monkeypatch.setattr(selector, "fused_linear_applies", lambda x, w: True)
    with torch.no_grad():  # references, on the fused path
        shifted, negated = F.linear(x + 1, t), F.linear(-x, t)
    direct = []
    real = ops.lut_linear
    monkeypatch.setattr(ops, "lut_linear", lambda *a: (direct.append(1), real(*a))[1])
    tangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    with fwAD.dual_level():
        got = fwAD.unpack_dual(F.linear(fwAD.make_dual(x, tangent), t)).tangent
    torch.testing.assert_close(got, F.linear(tangent, dense))
    _, jvp = torch.func.jvp(lambda r: F.linear(r, t), (x,), (tangent,))
    torch.testing.assert_close(jvp, F.linear(tangent, dense))
    with torch.no_grad():
        batched = torch.func.vmap(lambda r: F.linear(r, t))(x[None].expand(3, -1, -1))
        torch.testing.assert_close(batched[1], F.linear(x, dense))
        traced = torch.jit.trace(lambda r: F.linear(r, t), (x,), check_trace=False)
        torch.testing.assert_close(traced(x + 1), shifted)
        torch.testing.assert_close(F.linear(x._neg_view(), t), negated)
        with torch.autocast("cpu", dtype=torch.float16):
            assert F.linear(x.float(), t).dtype == torch.float16
        with pytest.raises(ValueError, match="bias dtype torch.float32"):
            F.linear(x, t, torch.zeros(24))
    assert direct == []  # none of these took the direct call
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # already autocast's dtype: fused
        assert F.linear(x, t).dtype == torch.bfloat16 and direct == [1]
        assert F.linear(x, t, torch.zeros(24)).dtype == torch.bfloat16  # autocast casts the bias
