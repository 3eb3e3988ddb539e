"""Triton kernels under TRITON_INTERPRET=1 on CPU tensors, against a float64 reference.

Every output buffer the launchers allocate is pre-filled with NaN, so an element a kernel fails
to write makes the comparison fail."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from any4ao import Any4Tensor
from any4ao.kernels import launch, ops  # noqa: F401  (ops registers torch.ops.any4ao.*)
from any4ao.kernels.launch import (
    KernelConfig, choose_config, lut_dequantize, lut_matmul, mma_applies, permute_lookup_applies, register_lut_config,
)
from helpers import reference_dequantize

# bf16 / fp16 operands with fp32 accumulation, one final rounding of the output.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(launch, "_empty", lambda shape, device, dtype: torch.full(shape, float("nan"), device=device, dtype=dtype))


def _problem(m, n, k, group_size, nbits, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    t = Any4Tensor.from_hp(w, nbits=nbits, group_size=group_size, iterations=3)
    x = torch.randn(m, k, generator=g).to(dtype)
    w64 = reference_dequantize(t.codes(), t.lut, t.scales, t.zeros, group_size)
    ref = x.double() @ w64.t()
    ref.magnitude = x.double().abs() @ w64.abs().t()  # scale of the rounding error of each dot product
    return t, x, ref


def _rel(out, ref):
    """Error relative to sum_k |x_k W_nk| (not |ref|, which cancellation can make arbitrarily small)."""
    assert not torch.isnan(out).any(), "unwritten (NaN-poisoned) or NaN output"
    return ((out.double() - ref).norm() / ref.magnitude.norm()).item()


CONFIGS = [
    None,  # the dispatcher's own choice
    # lut_mma (register LUT into mma.sync); lut_matmul falls back where it does not apply (x dtype
    # other than the LUT's, groups not a multiple of 32, M above block_m, ...)
    KernelConfig("decode-mma", 8, 32, 64, split_k=2, num_warps=4, num_stages=2, k_warps=2),
    # lut_decode (LUT by byte permutes); where it does not apply (2-bit codes, fp32, K % 8 != 0)
    # lut_matmul falls back to gather_config, so these also exercise the fallback.
    KernelConfig("decode-fma", 1, 16, 64, split_k=2),
    KernelConfig("decode-fma", 1, 8, 256, split_k=1, num_stages=1),
    KernelConfig("decode-dot", 16, 32, 64, split_k=3),
    KernelConfig("gemv", 4, 32, 32, split_k=3),
    KernelConfig("gemv", 8, 16, 64, split_k=1, lut_mode=1),
    KernelConfig("gemv", 1, 32, 128, split_k=2, lut_mode=2),
    KernelConfig("gemm", 16, 32, 32, split_k=1),
    KernelConfig("gemm", 32, 16, 16, split_k=4),
    KernelConfig("gemm", 16, 32, 64, split_k=2, lut_mode=1),
    KernelConfig("gemm", 16, 32, 64, split_k=1, lut_mode=2),
]


@given(
    m=st.integers(1, 40),
    n=st.integers(1, 70),
    k_groups=st.integers(1, 5),
    k_tail=st.sampled_from([0, 0, 2, 16]),
    group_size=st.sampled_from([16, 32, 48, 64]),
    nbits=st.sampled_from([2, 3, 4]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    config=st.sampled_from(CONFIGS),
    seed=st.integers(0, 2**16),
)
def test_lut_matmul_matches_float64(m, n, k_groups, k_tail, group_size, nbits, dtype, config, seed):
    k = k_groups * group_size + k_tail  # a tail makes the last group ragged
    if config is not None and config.kind == "gemv" and m > config.block_m:
        config = KernelConfig("gemv", 64, config.block_n, config.block_k, config.split_k)
    t, x, ref = _problem(m, n, k, group_size, nbits, dtype, seed)
    out = lut_matmul(x, t.qdata, t.lut, t.scales, t.zeros, nbits, group_size, config)
    assert out.shape == (m, n) and out.dtype == dtype
    assert _rel(out, ref) < TOLERANCE[dtype]


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
    permute = permute and permute_lookup_applies(t.qdata, t.lut, nbits, k)  # None: the launcher decides
    out = lut_dequantize(t.qdata, t.lut, t.scales, t.zeros, nbits, group_size, k, dtype, permute=permute)
    ref = t.dequantize(torch.float64)
    assert not torch.isnan(out).any()
    # fp32 arithmetic then one conversion to dtype. One full ulp, not half: the triton 3.9
    # interpreter converts fp32 -> bf16 by truncation, not round-to-nearest as the GPU does.
    terms = reference_dequantize(t.codes(), t.lut.abs(), t.scales.abs(), t.zeros.abs(), group_size)
    ulp = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float32: 2**-23}[dtype]
    assert torch.all((out.double() - ref).abs() <= 2**-22 * terms + ulp * ref.abs())


@pytest.mark.parametrize("m", [1, 3, 16, 40, 100, 1500])
def test_custom_op_paths(m):
    """torch.ops.any4ao.lut_linear over every dispatcher branch (gemv, gemm, dequantize + mm)."""
    t, x, ref = _problem(m, 48, 96, 32, 4, torch.float16, seed=m)
    out = torch.ops.any4ao.lut_linear(x, t.qdata, t.lut, t.scales, t.zeros, 4, 32)
    assert _rel(out, ref) < TOLERANCE[torch.float16]


def test_dispatcher_choices(monkeypatch):
    """choose_config on an H100's 132 SMs reproduces the sweep winners it was fitted to
    (sweep-H100-v14-prefetch.json); small K caps the K warps by the groups (a power of two)."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(launch, "_num_sms", lambda device: 132)

    def pick(m, n, k, group_size=128):
        cfg = choose_config(m, n, k, cpu, group_size)
        assert cfg.kind == "decode-mma" and cfg.scaled_a and cfg.block_n == 16 * cfg.row_tiles
        assert cfg.num_warps == cfg.k_warps
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
    # Where lut_mma does not apply, the previous register-LUT kernels (H100 sweeps: CUDA cores at M=1).
    assert register_lut_config(1, 4096, 4096, cpu).kind == "decode-fma"
    assert (register_lut_config(4, 4096, 4096, cpu).kind, register_lut_config(4, 4096, 4096, cpu).block_m) == ("decode-dot", 16)
    assert register_lut_config(16, 64, 8192, cpu).split_k > 1  # few output tiles: split K to fill the machine
    assert choose_config(512, 4096, 4096, cpu).block_m == 128
    assert 40 < ops.DEQUANT_THEN_MM_MIN_M <= 100  # test_custom_op_paths covers both sides of the switch


@settings(max_examples=10)  # each example runs the byte-permute and mma emulation in the interpreter: slow
@given(
    m=st.integers(1, 72),
    n_tiles=st.sampled_from([1, 2, 4, 8]),
    scaled_a=st.booleans(),
    spread=st.booleans(),
    n=st.integers(1, 70),
    k_groups=st.integers(1, 3),
    group_size=st.sampled_from([32, 64, 96, 128, 256]),
    nbits=st.sampled_from([3, 4]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    row_warps=st.sampled_from([1, 2]),
    row_tiles=st.sampled_from([1, 2]),
    k_warps=st.sampled_from([1, 2, 4]),
    block_k=st.sampled_from([32, 64, 128]),
    split_k=st.integers(1, 2),
    stages=st.integers(1, 3),
    prefetch=st.sampled_from([0, 1, 2]),
    seed=st.integers(0, 2**16),
)
def test_mma_kernel_matches_float64(m, n_tiles, scaled_a, spread, n, k_groups, group_size, nbits, dtype, row_warps,
                                    row_tiles, k_warps, block_k, split_k, stages, prefetch, seed):
    """lut_mma itself (no fallback): 1, 2, 4 or 8 n-tiles per program (scales folded after the
    mma or applied to the fragments), one or two 16-row weight tiles per warp, several programs along M,
    ragged N and M, 1-4 code words per lane and step, 1-8 steps per group, K warps that get no
    group, split K; the interpreter assembles the mma fragments into matrices, so the fragment
    bookkeeping is what is tested here."""
    k = k_groups * group_size
    t, x, ref = _problem(m, n, k, group_size, nbits, dtype, seed)
    assert mma_applies(x, t.qdata, t.lut, nbits, group_size)
    row_tiles = 1 if n_tiles == 8 else row_tiles  # two row tiles take at most 4 n-tiles
    scaled_a = scaled_a or n_tiles == 8 or row_tiles == 2  # both only with the scales in the fragments
    cfg = KernelConfig("decode-mma", 8 * n_tiles, 16 * row_tiles * row_warps, block_k, split_k, row_warps * k_warps,
                       stages, k_warps=k_warps, scaled_a=scaled_a, spread=spread, row_tiles=row_tiles,
                       prefetch=prefetch)
    calls = []
    real = launch._launch_mma
    launch._launch_mma = lambda *a: (calls.append(a[-1]), real(*a))
    try:
        out = lut_matmul(x, t.qdata, t.lut, t.scales, t.zeros, nbits, group_size, cfg)
    finally:
        launch._launch_mma = real
    assert calls == [cfg]
    assert out.shape == (m, n) and out.dtype == dtype
    assert _rel(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("even", [True, False])
def test_mma_prefetch_and_even_splits(prefetch, even):
    """Both load schedules (shared-memory pipeline, registers 1 or 2 steps ahead), with every warp
    getting the same number of groups (the kernel drops its load predicates) or not (6 groups over
    2 splits x 2 K warps: a warp of each split has a step outside it, which must add nothing), on
    ragged N and M (rows clamped, not masked: unstored rows must not leak into stored ones). The
    two kernel variants alternate over the cases (interpreter time), so each meets both splits."""
    m, n, group_size = 11, 40, 32
    k = (8 if even else 6) * group_size
    scaled_a, spread, row_tiles = [(True, False, 2), (False, True, 1)][(prefetch + even) % 2]
    t, x, ref = _problem(m, n, k, group_size, 4, torch.bfloat16, seed=prefetch + 3 * even + 7 * row_tiles)
    cfg = KernelConfig("decode-mma", 16, 16 * row_tiles, 64, 2, 2, 2, k_warps=2, scaled_a=scaled_a,
                       spread=spread, row_tiles=row_tiles, prefetch=prefetch)
    out = lut_matmul(x, t.qdata, t.lut, t.scales, t.zeros, 4, group_size, cfg)
    assert _rel(out, ref) < TOLERANCE[torch.bfloat16], (scaled_a, spread, row_tiles)


@pytest.mark.parametrize("cfg", [
    KernelConfig("decode-mma", 8, 16, 128, prefetch=3),
    KernelConfig("decode-mma", 64, 16, 128),  # 8 n-tiles need the scales in the fragments
    KernelConfig("decode-mma", 24, 16, 128, scaled_a=True),  # 3 n-tiles
    KernelConfig("decode-mma", 8, 24, 128),  # not whole 16-row warps
    KernelConfig("decode-mma", 8, 32, 128, row_tiles=2),  # two row tiles need the scales in the fragments
    KernelConfig("decode-mma", 64, 32, 128, scaled_a=True, row_tiles=2),  # ... and at most 4 n-tiles
    KernelConfig("decode-mma", 8, 16, 128, scaled_a=True, row_tiles=2),  # block_n not whole 32-row warps
    KernelConfig("decode-mma", 8, 48, 128, scaled_a=True, row_tiles=3),
])
def test_mma_rejects_configs_it_cannot_run(cfg):
    t, x, _ = _problem(4, 32, 64, 32, 4, torch.bfloat16, seed=1)
    with pytest.raises(ValueError, match="decode-mma takes"):
        lut_matmul(x, t.qdata, t.lut, t.scales, t.zeros, 4, 32, cfg)


@pytest.mark.parametrize("case", ["x-dtype", "group-16", "x-misaligned", "scales-fp32"])
def test_mma_falls_back_where_it_does_not_apply(case):
    """lut_mma needs x, scales and zeros in the LUT's dtype (it reads scales as 16-bit bits), 16-byte
    aligned x rows and groups of a multiple of 32; otherwise lut_matmul takes the previous kernels,
    with the same result."""
    group, dtype, m = (16 if case == "group-16" else 32), torch.bfloat16, 3
    t, x, ref = _problem(m, 24, 64, group, 4, dtype, seed=5)
    scales, zeros = t.scales, t.zeros
    if case == "x-dtype":
        x = x.half()
    if case == "x-misaligned":
        x = torch.cat([torch.zeros(1, dtype=dtype), x.flatten()])[1:].view(x.shape)  # data_ptr % 16 == 2
    if case == "scales-fp32":
        scales, zeros = scales.float(), zeros.float()
    assert not mma_applies(x, t.qdata, t.lut, 4, group, scales, zeros)
    calls = []
    real = launch._launch_mma
    launch._launch_mma = lambda *a: (calls.append(a), real(*a))
    try:
        out = lut_matmul(x, t.qdata, t.lut, scales, zeros, 4, group, KernelConfig("decode-mma", 8, 16, 128))
    finally:
        launch._launch_mma = real
    assert calls == []
    assert out.dtype == x.dtype
    assert _rel(out.to(dtype), ref) < TOLERANCE[torch.bfloat16]


@settings(max_examples=12)  # each example runs the byte-permute emulation in the interpreter: slow
@given(
    m=st.integers(1, 20),
    n=st.integers(1, 70),
    k_groups=st.integers(1, 4),
    group_size=st.sampled_from([16, 32, 48, 64, 128]),
    nbits=st.sampled_from([3, 4]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    kind=st.sampled_from(["decode-fma", "decode-dot"]),
    block_n=st.sampled_from([8, 16, 64]),
    block_k=st.sampled_from([32, 64, 256]),
    split_k=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_register_lut_kernels_match_float64(m, n, k_groups, group_size, nbits, dtype, kind, block_n, block_k, split_k, seed):
    """lut_decode itself (no fallback): nibble codes, 16-bit LUTs, K a multiple of 8, any block
    shape; the FMA kernel's K block may span several groups or part of one."""
    k = k_groups * group_size
    t, x, ref = _problem(m, n, k, group_size, nbits, dtype, seed)
    assert permute_lookup_applies(t.qdata, t.lut, nbits, k)
    block_m = 1 if kind == "decode-fma" else 16
    block_n = max(block_n, 16) if kind == "decode-dot" else block_n
    cfg = KernelConfig(kind, block_m, block_n, block_k, split_k)
    out = lut_matmul(x, t.qdata, t.lut, t.scales, t.zeros, nbits, group_size, cfg)
    assert out.shape == (m, n) and out.dtype == dtype
    assert _rel(out, ref) < TOLERANCE[dtype]


def test_split_k_is_deterministic():
    t, x, _ = _problem(2, 40, 512, 64, 4, torch.bfloat16, seed=1)
    cfg = KernelConfig("gemv", 2, 16, 32, split_k=4)
    a = lut_matmul(x, t.qdata, t.lut, t.scales, t.zeros, 4, 64, cfg)
    b = lut_matmul(x, t.qdata, t.lut, t.scales, t.zeros, 4, 64, cfg)
    assert torch.equal(a, b)


@pytest.mark.parametrize("lut_mode", [0, 1, 2])
def test_dequantize_kernel_lut_modes_agree(lut_mode):
    t, _, _ = _problem(1, 37, 200, 32, 4, torch.float32, seed=3)
    out = lut_dequantize(t.qdata, t.lut, t.scales, t.zeros, 4, 32, 200, torch.float32, lut_mode=lut_mode)
    torch.testing.assert_close(out, t.dequantize(), rtol=1e-6, atol=1e-6)


@settings(max_examples=10)  # the Triton dequantize (byte-permute emulation) in the interpreter is slow
@given(m=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_lut_linear_backward_gives_grad_out_times_w(m, seed):
    """QLoRA path: gradient to x through the custom op (Triton dequantize in the backward) equals
    grad_out @ W in float64; nothing flows to the frozen packed parts."""
    t, x, _ = _problem(m, 40, 64, 16, 4, torch.float16, seed)
    x.requires_grad_(True)
    out = torch.ops.any4ao.lut_linear(x, t.qdata, t.lut, t.scales, t.zeros, 4, 16)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out.dtype)
    out.backward(grad_out)
    w64 = reference_dequantize(t.codes(), t.lut, t.scales, t.zeros, 16)
    ref = grad_out.double() @ w64
    ref.magnitude = grad_out.double().abs() @ w64.abs()
    assert _rel(x.grad, ref) < TOLERANCE[torch.float16]


def test_misaligned_codes_take_the_gather_kernel():
    """Codes whose address is not 4-byte aligned cannot be read as 32-bit words, even when the
    storage offset looks fine (memory from torch.frombuffer or DLPack): lut_matmul must notice
    and fall back to the gather kernel, with the same result."""
    t, x, ref = _problem(1, 24, 64, 32, 4, torch.bfloat16, seed=3)
    raw = bytearray(t.qdata.numel() + 8)
    base = torch.frombuffer(raw, dtype=torch.uint8).data_ptr()
    skew = next(o for o in range(1, 4) if (base + o) % 4)
    shifted = torch.frombuffer(raw, dtype=torch.uint8, count=t.qdata.numel(), offset=skew).view(t.qdata.shape)
    shifted.copy_(t.qdata)
    assert shifted.storage_offset() == 0 and shifted.data_ptr() % 4
    assert permute_lookup_applies(shifted, t.lut, 4, 64)  # offsets alone cannot see it
    assert not permute_lookup_applies(shifted, t.lut, 4, 64, check_pointers=True)
    cfg = KernelConfig("decode-fma", 1, 16, 64, split_k=1)
    out = lut_matmul(x, shifted, t.lut, t.scales, t.zeros, 4, 32, cfg)
    assert _rel(out, ref) < TOLERANCE[torch.bfloat16]
