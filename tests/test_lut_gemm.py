"""The fused tensor-core LUT GEMM (kernels/lut_gemm.py) under TRITON_INTERPRET=1, against float64,
with NaN-poisoned outputs (test_kernels' autouse fixture, imported below)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_kernels import TOLERANCE, _args, _problem, _rel, poison_outputs  # noqa: F401  (autouse fixture)

from any4ao.kernels import launch, selector
from any4ao.kernels.launch import lut_gemm
from any4ao.kernels.selector import GemmConfig, choose, gemm_applies, gemm_config

CPU = torch.device("cpu")


@settings(max_examples=8, deadline=None)  # the byte-permute emulation and tl.dot in the interpreter: slow
@given(
    m=st.integers(1, 80),
    n=st.integers(1, 70),
    block_m=st.sampled_from([16, 32, 64]),
    block_n=st.sampled_from([16, 32, 64]),
    k_groups=st.integers(1, 3),
    group_size=st.sampled_from([32, 48, 64, 128]),
    block_k=st.sampled_from([16, 32, 64]),
    nbits=st.sampled_from([3, 4]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    split_k=st.integers(1, 3),
    swap_ab=st.booleans(),
    group_m=st.sampled_from([1, 2, 8]),
    prefetch=st.booleans(),
    pair_fma=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gemm_kernel_matches_float64(
    m,
    n,
    block_m,
    block_n,
    k_groups,
    group_size,
    block_k,
    nbits,
    dtype,
    split_k,
    swap_ab,
    group_m,
    prefetch,
    pair_fma,
    seed,
):
    """Ragged M and N (masked tiles), 1-8 K steps per group, split K (also more splits than steps
    divide evenly, so some splits have no step), both operand orders, grouped tile order with
    partial bands, code words prefetched a step ahead or not, scales applied by 16-bit pair FMAs or
    in float32."""
    while group_size % block_k:
        block_k //= 2
    k = k_groups * group_size
    t, x, ref = _problem(m, n, k, group_size, nbits, dtype, seed)
    assert gemm_applies(x, *_args(t), nbits, group_size)
    cfg = GemmConfig(block_m, block_n, block_k, split_k, group_m, swap_ab, prefetch=prefetch, pair_fma=pair_fma)
    out = lut_gemm(x, *_args(t), nbits, group_size, cfg)
    assert out.shape == (m, n) and out.dtype == dtype
    assert _rel(out, ref) < TOLERANCE[dtype], cfg


@settings(max_examples=6, deadline=None)
@given(
    m=st.integers(1, 70),
    n=st.integers(1, 70),
    block_m=st.sampled_from([16, 32, 64]),
    block_n=st.sampled_from([16, 32, 64]),
    k_groups=st.integers(1, 2),
    block_k=st.sampled_from([64, 128]),
    nbits=st.sampled_from([3, 4]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    split_k=st.integers(1, 3),
    prefetch=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gemm_pair_dot_matches_float64(
    m, n, block_m, block_n, k_groups, block_k, nbits, dtype, split_k, prefetch, seed
):
    """pair_dot: a step's 4 dots on the looked-up pairs as they are, against x with permuted columns
    (launch.x_pairs); ragged M and N, 1-4 steps, split K."""
    k = k_groups * 128
    t, x, ref = _problem(m, n, k, 128, nbits, dtype, seed)
    cfg = GemmConfig(block_m, block_n, block_k, split_k, 2, True, prefetch=prefetch, pair_dot=True)
    out = lut_gemm(x, *_args(t), nbits, 128, cfg)
    assert out.shape == (m, n) and out.dtype == dtype
    assert _rel(out, ref) < TOLERANCE[dtype], cfg


def test_x_pairs_orders_columns_as_the_looked_up_pairs():
    """Slot q of each step holds columns 8j + 2q, 8j + 2q + 1 of word j: the order lookup8's pairs
    come in."""
    x = torch.arange(2 * 128).reshape(2, 128)
    got = launch.x_pairs(x, 64)[0, :64].tolist()
    want = [8 * j + 2 * q + h for q in range(4) for j in range(8) for h in range(2)]
    assert got == want and launch.x_pairs(x, 64)[1, 64] == 128 + 64


@pytest.mark.parametrize("split_k", [1, 4])
@pytest.mark.parametrize("swap_ab", [False, True])
def test_gemm_prefetch_matches_float64(swap_ab, split_k):
    """A ragged problem of 5 K steps: split 4 ways that is 2 + 2 + 1 + an empty split (whose first
    prefetch must not read past K); the last step of each split re-reads itself."""
    t, x, ref = _problem(37, 45, 160, 32, 4, torch.bfloat16, seed=split_k)
    cfg = GemmConfig(32, 32, 32, split_k, 2, swap_ab, prefetch=True)
    out = lut_gemm(x, *_args(t), 4, 32, cfg)
    assert _rel(out, ref) < TOLERANCE[torch.bfloat16], cfg


@pytest.mark.parametrize("prefetch", [False, True])
def test_gemm_reads_a_ragged_last_group(prefetch):
    """K = 192 at group 128: the last group is 64 columns, its scale the row's second."""
    t, x, ref = _problem(70, 40, 192, 128, 4, torch.bfloat16, seed=7)
    cfg = gemm_config(70, 40, 192, 128, CPU)
    assert cfg is not None and 192 % cfg.block_k == 0
    out = lut_gemm(x, *_args(t), 4, 128, GemmConfig(32, 32, 64, prefetch=prefetch))
    assert _rel(out, ref) < TOLERANCE[torch.bfloat16]


def test_gemm_weights_match_the_dequantize_kernel():
    """lut_gemm rounds each looked-up weight to x's dtype once, as the dequantize kernel does, so with
    an exact one-hot x the product reads back the dequantized matrix bit for bit."""
    n, k, group_size = 24, 64, 32
    t, _, _ = _problem(1, n, k, group_size, 4, torch.float16, seed=4)
    x = torch.eye(k, dtype=torch.float16)
    out = lut_gemm(x, *_args(t), 4, group_size, GemmConfig(64, 32, 32, swap_ab=True))
    w = launch.lut_dequantize(*_args(t), 4, group_size, k, torch.float16)
    assert torch.equal(out, w.t().contiguous())


@pytest.mark.parametrize(
    "cfg",
    [
        GemmConfig(48, 64, 32),  # block_m not a power of two
        GemmConfig(64, 512, 32),
        GemmConfig(64, 64, 64),  # block_k does not divide the group (32)
        GemmConfig(64, 64, 8),
        GemmConfig(64, 64, 32, split_k=0),
        GemmConfig(64, 64, 32, group_m=0),
        GemmConfig(128, 256, 32, swap_ab=True, prefetch=True),  # miscompiled on the H200
        GemmConfig(64, 64, 32, swap_ab=True, pair_dot=True),  # block_k < 64: dots of K < 16
        GemmConfig(64, 64, 32, pair_dot=True),  # W not the register operand
    ],
)
def test_gemm_rejects_configs_it_cannot_run(cfg):
    t, x, _ = _problem(4, 32, 64, 32, 4, torch.bfloat16, seed=1)
    with pytest.raises(ValueError, match="lut_gemm (takes|refuses)"):
        lut_gemm(x, *_args(t), 4, 32, cfg)


def test_gemm_does_not_apply_to_layouts_it_cannot_read():
    """Strided x columns (a transposed view) and K not a multiple of the K step fall back."""
    t, x, _ = _problem(80, 24, 64, 32, 4, torch.bfloat16, seed=2)
    xt = x.t().contiguous().t()
    assert not gemm_applies(xt, *_args(t), 4, 32)
    t2, x2, _ = _problem(80, 24, 72, 32, 4, torch.bfloat16, seed=2)  # K = 72: a partial group
    assert not gemm_applies(x2, *_args(t2), 4, 32)
    assert choose(x2, *_args(t2), 4, 32) is None


def test_gemm_config_fills_the_gpu_and_steps_within_groups():
    for m, n, k, group in [(65, 4096, 4096, 128), (512, 28672, 4096, 128), (8192, 4096, 14336, 64), (100, 64, 96, 32)]:
        cfg = gemm_config(m, n, k, group, CPU)
        assert cfg is not None and group % cfg.block_k == 0 and k % cfg.block_k == 0
        launch.check_gemm_config(cfg, k, group)
    assert gemm_config(selector.FUSED_MAX_M, 4096, 4096, 128, CPU) is None


def test_h200_and_h100_gemm_rules_pick_the_sweep_winners(monkeypatch):
    """The H200 rules (sweep-gemm-NVIDIA-H200-prefetch-*.md): lut_gemm at 64 < M <= 128 on weights
    of at least 4096x4096 elements (128-column steps except on the widest N, prefetched; W the right
    operand where N >= 14336), at M <= 256 on weights of at least 14336x4096 elements (256-row tiles);
    dequantize + mm elsewhere (sweep-gemm-NVIDIA-H200-pairfma.md). A GPU with no measured rules takes
    dequantize + mm."""
    cuda = torch.device("cuda")  # only its type is read; _device_facts is replaced
    monkeypatch.setattr(selector, "_device_facts", lambda device: ("NVIDIA H200", 132, (9, 0)))

    def pick(m, n, k):
        cfg = gemm_config(m, n, k, 128, cuda)
        return cfg and (cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k, cfg.prefetch, cfg.swap_ab)

    assert pick(65, 14336, 4096) == (128, 128, 128, 1, True, False)
    assert pick(128, 4096, 14336) == (128, 128, 128, 4, True, True)  # 32 tiles: split K over the SMs
    assert pick(128, 4096, 4096) == (128, 128, 128, 4, True, True)
    assert pick(128, 28672, 4096) == (128, 128, 64, 1, True, False)
    assert pick(256, 28672, 4096) == (256, 128, 64, 1, True, True)
    assert pick(256, 4096, 14336) == (256, 128, 64, 4, True, True)
    assert pick(256, 4096, 4096) is None
    assert pick(512, 14336, 4096) is None
    assert pick(128, 2048, 2048) is None  # below every measured weight size
    # a ragged last group (K = 4160 at group 128): the rule's 128-column steps would straddle K's end
    assert pick(128, 14336, 4160) == (128, 128, 64, 1, True, False)
    assert not gemm_config(128, 14336, 4096, 128, cuda).pair_dot
    # the H100 takes the same rules (sweep-gemm-NVIDIA-H100-80GB-HBM3-w16.md) but for pair_dot where
    # 14336 <= N < 20480 (sweep-gemm-NVIDIA-H100-80GB-HBM3-pairdot.md) and no prefetch where N >= 20480
    # at M <= 128 (sweep-gemm-NVIDIA-H100-80GB-HBM3-pairdot-2.md)
    monkeypatch.setattr(selector, "_device_facts", lambda device: ("NVIDIA H100 80GB HBM3", 132, (9, 0)))
    assert pick(65, 14336, 4096) == (128, 128, 128, 1, False, True)
    assert gemm_config(65, 14336, 4096, 128, cuda).pair_dot
    assert pick(128, 28672, 4096) == (128, 128, 64, 1, False, False)
    assert pick(128, 4096, 4096) == (128, 128, 128, 4, True, True)
    assert pick(256, 28672, 4096) == (256, 128, 64, 1, True, True)
    assert pick(512, 14336, 4096) is None
    monkeypatch.setattr(selector, "_device_facts", lambda device: ("Some GPU", 100, (9, 0)))
    assert pick(128, 28672, 4096) is None


def test_rule_configs_compile_for_hopper_without_spills(tmp_path):
    """Every lut_gemm config a GEMM rule can pick, compiled for sm_90a by triton and ptxas on this
    CPU (benchmarks/inspect_compile.py; no GPU, no TRITON_INTERPRET): no register spills (an empty
    stack frame), at least one CTA per SM, wgmma in the loop. A kernel change that makes the GPU
    path spill fails here. (lut_mma is not held to this: at the register limit its spills differ
    between triton versions; the tool reports them.)"""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    configs = {
        (r.block_m, r.block_n, r.block_k, r.num_warps, (r.swap_ab, r.prefetch, r.pair_dot))
        for rules in selector.GEMM_RULES.values()
        for r in rules
    }
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    reports = []
    for flags in sorted({c[4] for c in configs}):
        tiles = ",".join(f"{bm}x{bn}x{bk}x{w}x3" for bm, bn, bk, w, f in configs if f == flags)
        cmd = [sys.executable, str(root / "benchmarks" / "inspect_compile.py"), "--tiles", tiles, "--mma", ""]
        on_off = ["on" if flag else "off" for flag in flags]
        cmd += ["--swap", on_off[0], "--prefetch", on_off[1], "--pair-dot", on_off[2], "--out", str(tmp_path)]
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)
        reports += json.loads((tmp_path / "inspect-compile-sm90.json").read_text())["rows"]
    assert len(reports) == len(configs)
    for r in reports:
        assert r["stack_bytes"] == 0 and r["ctas_per_sm"] >= 1 and r["wgmma"] >= 1, r
