"""The warp-specialised Gluon LUT GEMM (kernels/lut_gemm_ws.py) against float64, with NaN-poisoned
outputs (test_kernels' autouse fixture). Gluon has no interpreter path: these run only on a Hopper
GPU (benchmarks/check_ws_gemm.py runs the same checks, with timings, on the device machine); on
the CPU only the launcher's refusals are checked."""

import inspect

import pytest
import torch
from helpers import reference_dequantize
from hypothesis import given, settings
from hypothesis import strategies as st
from test_kernels import TOLERANCE, _args, _rel, poison_outputs  # noqa: F401  (autouse fixture)

from any4ao import Any4Tensor
from any4ao.kernels.launch import lut_gemm_ws

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
on_hopper = pytest.mark.skipif(not HOPPER, reason="the Gluon kernel runs on Hopper GPUs only")


def _cuda_problem(m, n, k, group_size, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    t = Any4Tensor.from_hp(w, group_size=group_size, kmeans_iterations=3).to("cuda")
    x = torch.randn(m, k, generator=g).to(dtype).cuda()
    w64 = reference_dequantize(t.codes(), t.lut, t.scale, t.zero_point, group_size).cuda()
    ref = x.double() @ w64.t()
    ref.magnitude = x.double().abs() @ w64.abs().t()
    return t, x, ref


@on_hopper
@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 300),
    n=st.integers(1, 300),
    k_groups=st.integers(1, 4),
    group_size=st.sampled_from([64, 128, 256]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    tile=st.sampled_from(
        [
            (64, 64, 6, 1, 4),
            (128, 64, 4, 1, 4),
            (128, 128, 4, 1, 4),
            (256, 64, 3, 1, 4),
            (128, 128, 4, 2, 4),
            (64, 64, 3, 3, 4),
            (128, 128, 4, 1, 8),
            (64, 64, 6, 2, 8),
        ]
    ),
    seed=st.integers(0, 2**16),
)
def test_ws_gemm_matches_float64(m, n, k_groups, group_size, dtype, tile, seed):
    """Ragged M and N (TMA zero-fills the rows past M and N, the store masks them), 1-16 K steps,
    every ring depth wrapping around several times; split K where it divides the steps (a split may
    start mid-group)."""
    k = k_groups * group_size
    t, x, ref = _cuda_problem(m, n, k, group_size, dtype, seed)
    bm, bn, stages, split_k, lookup_warps = tile
    split_k = split_k if k % (64 * split_k) == 0 else 1
    out = lut_gemm_ws(
        x, *_args(t), group_size, block_m=bm, block_n=bn, stages=stages, split_k=split_k, lookup_warps=lookup_warps
    )
    assert out.shape == (m, n) and out.dtype == dtype
    assert _rel(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize(
    "case, message",
    [
        ("group-32", "multiples of 64"),
        ("lut-fp32", "one 16-bit dtype"),
        ("3-bit", "4-bit codes"),
        ("block-n", "block_n 64 or 128"),
        ("block-m", r"block_m 64, 128 or 256 .*got 256 x 128"),  # the accumulator spills
        ("one-stage", "stages >= 2"),  # would hang: the wgmma warps hold the only slot
        ("zero-point-stride", "one row stride"),  # the kernel reads zero points with scale's stride
        ("strided-lut", "contiguous LUT"),
        ("misaligned-x", "x with unit-stride rows, 16-byte aligned"),
        ("split-k-zero", "split_k >= 1"),
        ("split-k-bool", r"split_k >= 1 \(got True\)"),  # passed `>= 1`, then failed in torch.empty
        ("lookup-warps-float", r"lookup_warps 4, or 8 .*got 8.0"),  # passed `in (4, 8)`, then reached the GPU
        ("lookup-warps", "lookup_warps 4, or 8 with block_m <= 128"),  # 16 warps: ptxas refuses the 256-wide wgmma
        ("split-k-ragged", r"K a multiple of 64 x split_k \(got K 128, split_k 4\)"),  # a split of half a step
    ],
)
def test_ws_gemm_refuses_layouts_it_cannot_read(case, message):
    """Checked before any GPU work, so this runs on the CPU too."""
    group_size = 32 if case == "group-32" else 64
    nbits = 3 if case == "3-bit" else 4
    dtype = torch.float32 if case == "lut-fp32" else torch.bfloat16
    w = torch.randn(8, 128, dtype=dtype)
    t = Any4Tensor.from_hp(w, codebook=f"any{nbits}", group_size=group_size, kmeans_iterations=1)
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    qdata, lut, scale, zero_point = _args(t)
    tile = dict(block_m=128, block_n=128, stages=4)
    if case == "block-n":
        tile["block_n"] = 96
    if case == "block-m":
        tile["block_m"] = 256
    if case == "one-stage":
        tile["stages"] = 1
    if case == "zero-point-stride":
        zero_point = torch.zeros(8, 8, dtype=dtype)[:, :2].copy_(zero_point)
    if case == "strided-lut":
        lut = lut.t().contiguous().t()
    if case == "misaligned-x":
        x = torch.randn(2 * 128 + 1, dtype=torch.bfloat16)[1:].view(2, 128)
    if case == "split-k-zero":
        tile["split_k"] = 0
    if case == "split-k-bool":
        tile["split_k"] = True
    if case == "lookup-warps-float":
        tile["lookup_warps"] = 8.0
    if case == "lookup-warps":
        tile.update(block_m=256, block_n=64, lookup_warps=8)
    if case == "split-k-ragged":
        tile["split_k"] = 4
    with pytest.raises(ValueError, match=message):
        lut_gemm_ws(x, qdata, lut, scale, zero_point, group_size, **tile)


def test_ws_rules_take_only_launches_that_compile_and_cannot_hang():
    from any4ao.kernels.selector import WsConfig, WsRule

    assert WsRule(129, 512, 0, 256, 64, 3).block_m == 256
    with pytest.raises(ValueError, match="stages >= 2"):
        WsRule(129, 512, 0, 128, 128, 1)
    with pytest.raises(ValueError, match="block_m"):
        WsConfig(256, 128, 4)
    with pytest.raises(ValueError, match="split_k >= 1"):
        WsRule(129, 512, 0, 128, 128, 4, 0)
    assert WsRule(129, 512, 0, 128, 128, 4).split_k == 1
    with pytest.raises(ValueError, match="split_k >= 1"):
        WsConfig(128, 128, 4, True)
    with pytest.raises(ValueError, match="lookup_warps 4, or 8"):
        WsRule(129, 512, 0, 128, 128, 4, 1, 4.0)


def test_selector_takes_ws_only_where_a_rule_and_the_layout_allow(monkeypatch):
    """ws_config: a Hopper GPU whose name a WS_RULES key matches, M within the rule, N above its
    floor; ws_applies: the layouts the kernel reads (4-bit, one 16-bit dtype, K and group multiples
    of 64, TMA-aligned rows)."""
    from any4ao.kernels import selector
    from any4ao.kernels.selector import WsConfig, WsRule, ws_applies, ws_config

    monkeypatch.setitem(selector.WS_RULES, "H200", (WsRule(129, 512, 8192, 128, 128, 4),))
    facts = ("NVIDIA H200", 132, (9, 0), True)
    assert ws_config.__wrapped__(256, 14336, 4096, 128, *facts) == WsConfig(128, 128, 4)
    assert ws_config.__wrapped__(128, 14336, 4096, 128, *facts) is None  # below min_m
    assert ws_config.__wrapped__(256, 4096, 4096, 128, *facts) is None  # below min_n
    assert ws_config.__wrapped__(256, 14336, 4096, 128, "NVIDIA A100", 108, (8, 0), True) is None
    assert ws_config.__wrapped__(256, 14336, 4096, 128, "NVIDIA H100", 132, (9, 0), True) is None  # no rules
    monkeypatch.setitem(selector.WS_RULES, "H200", (WsRule(129, 512, 0, 128, 128, 4, 4),))
    assert ws_config.__wrapped__(256, 4096, 4096, 128, *facts) == WsConfig(128, 128, 4, 4)
    # K = 4160 is 65 steps of 64: 4 splits cannot each take whole steps, so the rule runs unsplit
    assert ws_config.__wrapped__(256, 4096, 4160, 64, *facts) == WsConfig(128, 128, 4, 1)

    def parts(nbits=4, dtype=torch.bfloat16, group_size=128, k=256):
        w = torch.randn(8, k, dtype=dtype)
        t = Any4Tensor.from_hp(w, codebook=f"any{nbits}", group_size=group_size, kmeans_iterations=1)
        return torch.randn(4, k, dtype=torch.bfloat16), *_args(t), nbits, group_size

    assert ws_applies(*parts())
    assert not ws_applies(*parts(nbits=3))
    assert not ws_applies(*parts(dtype=torch.float16))  # x bf16, LUT fp16
    assert not ws_applies(*parts(group_size=32, k=96))
    x, qdata, lut, scale, zero_point, nbits, group_size = parts()
    # x one element off 16-byte alignment (TMA reads from an aligned base), K = 128 within the codes
    assert ws_applies(x[:, :128], qdata[:, :64], lut, scale, zero_point, nbits, group_size)
    assert not ws_applies(x[:, 1:129], qdata[:, :64], lut, scale, zero_point, nbits, group_size)


def test_lut_linear_launches_the_ws_config_it_is_given(monkeypatch):
    """The op hands every field of the selector's WsConfig to the launcher's parameter of that name
    (CPU: the selector and the launch are stand-ins)."""
    from any4ao.kernels import ops
    from any4ao.kernels.selector import WsConfig

    w = torch.randn(8, 128, dtype=torch.bfloat16)
    t = Any4Tensor.from_hp(w, group_size=64, kmeans_iterations=1)
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    config = WsConfig(128, 64, 3, 2, 8)
    signature, launched = inspect.signature(lut_gemm_ws), []

    def record(*args, **kwargs):
        launched.append(signature.bind(*args, **kwargs).arguments)
        return args[0]

    monkeypatch.setattr(ops, "choose", lambda *args: config)
    monkeypatch.setattr(ops, "lut_gemm_ws", record)
    ops.lut_linear(x, *_args(t), 4, 64)
    (bound,) = launched
    assert {name: bound[name] for name in vars(config)} == vars(config) and bound["group_size"] == 64
