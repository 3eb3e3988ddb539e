"""Which kernel serves `x @ W^T` for an Any4Tensor W, and how it is launched. The one place.

Four paths:
  lut_mma             the fused decode kernel (kernels/lut_mma.py): M <= FUSED_MAX_M rows of x,
                      16-bit x and LUT, nibble-packed codes, groups of a multiple of 32 columns;
  lut_gemm            the fused tensor-core GEMM (kernels/lut_gemm.py) for larger M: same layouts,
                      W looked up per tile in registers and fed to tl.dot; where GEMM_RULES
                      (measured per GPU) say it beats dequantize + mm;
  lut_gemm_ws         the warp-specialised Gluon GEMM (kernels/lut_gemm_ws.py), Hopper only:
                      4-bit codes, one 16-bit dtype, K and group multiples of 64; where WS_RULES
                      (measured per GPU) say it beats the paths above;
  dequantize + mm     everything else: the Triton dequantize kernel writes W in x's dtype, then
                      cuBLAS.

The launch config of lut_mma comes from a per-GPU table of rules (RULES), each measured by a
sweep on that GPU (benchmarks/bench_kernels.py --sweep-only; results in benchmarks/results/):
the first rule whose `max_m` >= M and `min_n` <= N applies. A GPU with no table of its own uses
the H100 table with its N thresholds scaled by the SM count (they mark where the grid outgrows the
SMs), and GPUs older than sm_80 (no bf16 mma.sync / fma.bf16x2) take dequantize + mm.
"""

import functools
import math
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple, Union

import torch

FUSED_MAX_M = 64
MIN_CAPABILITY = (8, 0)


@functools.lru_cache(maxsize=1)
def kernels_loaded() -> bool:
    """Triton is importable and the custom ops are registered (torch.ops.any4ao.*)."""
    try:
        import triton  # noqa: F401

        import any4ao.kernels.ops  # noqa: F401
    except ImportError:
        return False
    return True


def fused_linear_applies(x: torch.Tensor, weight) -> bool:
    """The Triton op (torch.ops.any4ao.lut_linear) takes CUDA, 16-bit activations and an
    untransposed weight that prefers "auto"; everything else is dequantize + F.linear."""
    return (
        x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and not weight.transposed
        and weight.kernel_preference == "auto"
        and kernels_loaded()
    )


@dataclass(frozen=True)
class MmaConfig:
    """A lut_mma launch: block_m rows of x per program (8 per n-tile), row_tiles 16-row weight tiles
    per warp, k_warps warps splitting the program's K, code words prefetched 1 or 2 steps ahead,
    spread: a lane's words of a step 4 apart."""

    block_m: int
    row_tiles: int
    k_warps: int
    prefetch: int
    spread: bool = False
    split_k: int = 1

    @property
    def block_n(self) -> int:
        return 16 * self.row_tiles


@dataclass(frozen=True)
class GemmConfig:
    """A lut_gemm launch: (block_m, block_n) output tiles, block_k columns per step (dividing the
    group), split_k programs along K, group_m M tiles per band (L2 reuse of W tiles), swap_ab:
    the looked-up W tile as the left tl.dot operand; prefetch: load each K step's code words and
    scales one step ahead, in registers; pair_fma: scale and zero applied with one 16-bit pair FMA
    per two weights where LUT, scales and x share a dtype (off: in float32, for A/B timing);
    pair_dot (with swap_ab, block_k >= 64): the looked-up 16-bit pairs go to the MMA as they are,
    against x with its columns permuted to match (lut_gemm.py), where pair_fma applies."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    swap_ab: bool = False
    num_warps: int = 4
    num_stages: int = 3
    prefetch: bool = False
    pair_fma: bool = True
    pair_dot: bool = False


@dataclass(frozen=True)
class Rule:
    """For M <= max_m and N >= min_n: this tile shape, and as many K warps (a power of two in
    [min_k_warps, max_k_warps], at most one per group) as keep the grid within warps_per_sm warps
    per SM."""

    max_m: int
    min_n: int
    block_m: int
    row_tiles: int
    prefetch: int
    spread: bool
    warps_per_sm: int
    min_k_warps: int
    max_k_warps: int


# H100 (132 SMs), fitted to sweep v14 (benchmarks/results/sweep-H100-v14-prefetch.json: 7 shapes,
# N 1024-28672, K 4096-14336, every combination of K warps, row tiles, prefetch and spread): the
# picks are within 4 % of each shape's best config on geometric mean at M = 1, 8, 16, 32, 64.
_H100 = (
    Rule(8, 4225, 8, 1, 1, False, 24, 4, 8),  # many programs: 1 step ahead is enough
    Rule(8, 0, 8, 1, 2, False, 24, 4, 8),
    Rule(16, 8192, 16, 2, 1, False, 8, 2, 8),  # two row tiles: each x fragment feeds two mmas
    Rule(16, 0, 16, 1, 2, False, 16, 1, 8),
    Rule(32, 4096, 32, 2, 2, False, 8, 1, 4),
    Rule(32, 2048, 32, 1, 2, True, 8, 1, 4),
    Rule(32, 0, 16, 1, 2, True, 8, 1, 4),
    Rule(64, 4096, 32, 2, 2, False, 8, 1, 4),
    Rule(64, 0, 16, 1, 2, True, 8, 1, 4),
)
_H100_SMS = 132

# H200 (132 SMs), sweep v15 (benchmarks/results/sweep-H200-v15-selector.json: 5 shapes, N 1024-28672,
# M 1, 8, 16, 32, 64, every combination of K warps 1-8, row tiles, prefetch and spread). The H100
# table is within 2 % of each shape's best there at M = 1, 8, 16, 64 (geometric mean) but 10 % off
# at M = 32, where the H200 wants up to 8 K warps and, below N = 2048, consecutive words: with these
# three rules 3.4 % (worst 12 %).
_H200 = (
    _H100[:4]
    + (
        Rule(32, 4096, 32, 2, 2, False, 8, 1, 8),
        Rule(32, 2048, 32, 1, 2, True, 8, 1, 8),
        Rule(32, 0, 16, 1, 2, False, 8, 1, 8),
    )
    + _H100[7:]
)

# name (a substring of torch.cuda.get_device_name) -> (rules, SM count they were fitted on)
RULES = {
    "H200": (_H200, 132),
    "H100": (_H100, _H100_SMS),
}


def _k_warps(programs: int, groups: int, sms: int, rule: Rule) -> int:
    k_warps = 1
    while 2 * k_warps <= min(rule.min_k_warps, groups):
        k_warps *= 2
    while 2 * k_warps <= min(rule.max_k_warps, groups) and programs * 2 * k_warps <= rule.warps_per_sm * sms:
        k_warps *= 2
    return k_warps


@functools.lru_cache(maxsize=None)
def _device_table(device_name: str, sms: int) -> Tuple[Tuple[Rule, ...], int]:
    for key, (rules, fitted_sms) in RULES.items():
        if key in device_name:
            return rules, fitted_sms
    rules, fitted_sms = RULES["H100"]
    if sms == fitted_sms:
        return rules, fitted_sms
    scale = sms / fitted_sms  # unknown GPU: N thresholds follow the SM count
    return tuple(Rule(**{**r.__dict__, "min_n": int(r.min_n * scale)}) for r in rules), sms


def _device_facts(device: torch.device) -> Tuple[str, int, Tuple[int, int]]:
    if device.type != "cuda":  # TRITON_INTERPRET=1 on CPU tensors: tested as an H100
        return "H100 (interpreter)", _H100_SMS, (9, 0)
    return _cuda_facts(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_facts(index: int) -> Tuple[str, int, Tuple[int, int]]:
    props = torch.cuda.get_device_properties(index)  # 23 us per call under cProfile on the H100 host
    return props.name, props.multi_processor_count, (props.major, props.minor)


def _cached(config_fn):
    """The config functions run on every matmul: memoised on (M, N, K, group, device facts), as
    plain ints; other size types (tracing, numpy) are computed each time. RULES / GEMM_RULES are
    read once per memoised shape: after changing a table at run time, call `.cache_clear()`."""
    cached = functools.lru_cache(maxsize=4096)(config_fn)

    def lookup(m, n, k, group_size, device):
        args = (m, n, k, group_size, *_device_facts(device), device.type == "cuda")
        if all(type(a) is int for a in args[:4]):
            return cached(*args)
        return config_fn(*args)

    lookup = functools.wraps(config_fn)(lookup)
    lookup.cache_clear = cached.cache_clear
    return lookup


@_cached
def mma_config(
    m: int, n: int, k: int, group_size: int, name: str, sms: int, capability: Tuple[int, int], cuda: bool
) -> Optional[MmaConfig]:
    """The lut_mma launch for an (M, K) x (N, K)^T product, or None where dequantize + mm serves it.
    Called as mma_config(m, n, k, group_size, device)."""
    if m > FUSED_MAX_M or capability < MIN_CAPABILITY:
        return None
    rules, _ = _device_table(name, sms)
    rule = next(r for r in rules if m <= r.max_m and n >= r.min_n)
    programs = -(-n // (16 * rule.row_tiles)) * -(-m // rule.block_m)
    k_warps = _k_warps(programs, max(k // group_size, 1), sms, rule)
    return MmaConfig(rule.block_m, rule.row_tiles, k_warps, rule.prefetch, rule.spread)


def mma_applies(
    x: torch.Tensor,
    qdata: torch.Tensor,
    lut: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    nbits: int,
    group_size: int,
) -> bool:
    """lut_mma reads codes as 32-bit words (nibbles: 3 or 4 bits, 4-byte aligned rows), the LUT as
    pairs of 16-bit entries, x 16 bytes at a time (16-byte aligned rows) in the LUT's dtype (the
    looked-up values go into the mma as they are), scales and zero points as 16-bit bits, and steps
    through whole groups of a multiple of 32 columns."""
    k = x.shape[1]
    return (
        nbits in (3, 4)
        and lut.dtype in (torch.float16, torch.bfloat16)
        and x.dtype == lut.dtype
        and scale.dtype == lut.dtype
        and zero_point.dtype == lut.dtype
        and group_size % 32 == 0
        and k % group_size == 0
        and qdata.stride(-1) == 1
        and qdata.stride(0) % 4 == 0
        and qdata.data_ptr() % 4 == 0
        and lut.is_contiguous()
        and lut.data_ptr() % 4 == 0
        and x.stride(1) == 1
        and x.stride(0) % 8 == 0
        and x.data_ptr() % 16 == 0
    )


def gemm_applies(
    x: torch.Tensor,
    qdata: torch.Tensor,
    lut: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    nbits: int,
    group_size: int,
) -> bool:
    """lut_gemm reads codes as 32-bit words and the LUT as pairs of 16-bit entries (as the register
    dequantize does), x as contiguous rows of a 16-bit dtype, and steps through K in blocks of at
    least 16 columns that divide the group."""
    k = x.shape[1]
    return (
        x.dtype in (torch.float16, torch.bfloat16)
        and x.stride(1) == 1
        and group_size % 16 == 0
        and k % block_k_within_group(group_size) == 0
        and permute_dequantize_applies(qdata, lut, nbits, k)
    )


def block_k_within_group(group_size: int, block_k: int = 64) -> int:
    """Largest block_k / 2**i dividing the group size, so a K block never straddles two groups."""
    while group_size % block_k:
        block_k //= 2
    return block_k


@dataclass(frozen=True)
class GemmRule:
    """lut_gemm serves FUSED_MAX_M < M <= max_m where N >= min_n and the weight has at least
    min_weights elements (there the dequantized copy that dequantize + mm writes per call costs
    more than looking the weights up once per M tile); block_m x block_n tiles, block_k columns
    per step (or the largest power of two dividing the group), the looked-up W as the left operand
    (swap_ab) or the right one, code words prefetched a step ahead or not, the looked-up pairs as
    dot operands (pair_dot), num_warps per program."""

    max_m: int
    min_n: int
    min_weights: int
    block_k: int
    block_m: int = 128
    block_n: int = 128
    prefetch: bool = False
    swap_ab: bool = True
    num_warps: int = 8
    pair_dot: bool = False


# From benchmarks/results/sweep-gemm-NVIDIA-H200-prefetch-*.md (CUDA graphs, weights rotated past
# L2; sweep-gemm-NOTE.md): at M = 65 and 128 lut_gemm beat dequantize + mm on all four Llama-3-8B
# shapes (1.0-1.6x; 4096x4096 only just), at M = 256 on the three large ones (1.1-1.2x), and lost
# everywhere at M = 512. GPUs with no rules measured on them take dequantize + mm. With the 16-bit
# pair FMA (sweep-gemm-NVIDIA-H200-pairfma.md) W as the right operand wins at M = 128 where N >= 14336
# (14336x4096: 51.4 us against 56.5 with swap_ab; 28672x4096: 96.0 against 100.6).
GEMM_RULES = {
    "H200": (
        GemmRule(max_m=128, min_n=20480, min_weights=14336 * 4096, block_k=64, prefetch=True, swap_ab=False),
        GemmRule(max_m=128, min_n=14336, min_weights=14336 * 4096, block_k=128, prefetch=True, swap_ab=False),
        GemmRule(max_m=128, min_n=0, min_weights=4096 * 4096, block_k=128, prefetch=True),
        GemmRule(max_m=256, min_n=0, min_weights=14336 * 4096, block_k=64, block_m=256, prefetch=True),
    )
}
# The H100 (sweep-gemm-NVIDIA-H100-80GB-HBM3-w16.md, same tiles on the four Llama-3-8B shapes at M = 128, 256,
# 512): the H200's picks are within 3 % of the H100's best config at M = 128 and 256 on every shape and 1.3-2.3x
# faster than dequantize + mm there; at M = 512 dequantize + mm wins, as on the H200. Except where 14336 <= N <
# 20480 at M <= 128 (one K split): there pair_dot, 128x128x128 tiles without prefetch, took 55.3 us on 14336x4096
# at M = 128 against 62.1 for the H200's pick (sweep-gemm-NVIDIA-H100-80GB-HBM3-pairdot.md; not measured on the
# H200, nor on 28672x4096). Where K is split (the N = 4096 shapes) and at M = 256 pair_dot lost (28.9 against 25.7
# us, 104 against 84). Where N >= 20480 at M <= 128 the H200's pick without prefetch: 97.7 us on 28672x4096 at
# M = 128 against 114.8 with it (sweep-gemm-NVIDIA-H100-80GB-HBM3-pairdot-2.md; pair_dot 107.7).
GEMM_RULES["H100"] = (
    replace(GEMM_RULES["H200"][0], prefetch=False),
    GemmRule(max_m=128, min_n=14336, min_weights=14336 * 4096, block_k=128, pair_dot=True),
    *GEMM_RULES["H200"][2:],
)


@_cached
def gemm_config(
    m: int, n: int, k: int, group_size: int, name: str, sms: int, capability: Tuple[int, int], cuda: bool
) -> Optional[GemmConfig]:
    """The lut_gemm launch for M > FUSED_MAX_M, or None where dequantize + mm serves it. Under
    TRITON_INTERPRET=1 (CPU tensors) every such M takes lut_gemm, so the op's path is tested.
    Called as gemm_config(m, n, k, group_size, device)."""
    if m <= FUSED_MAX_M or capability < MIN_CAPABILITY:
        return None
    if cuda:
        rules = next((r for key, r in GEMM_RULES.items() if key in name), ())
        rule = next((r for r in rules if m <= r.max_m and n >= r.min_n and n * k >= r.min_weights), None)
        if rule is None:
            return None
        block_m, block_n, block_k, prefetch, swap_ab, num_warps, pair_dot = (
            rule.block_m,
            rule.block_n,
            rule.block_k,
            rule.prefetch,
            rule.swap_ab,
            rule.num_warps,
            rule.pair_dot,
        )
    else:
        block_m, block_n, block_k, prefetch, swap_ab, num_warps, pair_dot = 128, 128, 64, True, True, 8, False
    # a K step divides the group and K (a ragged last group: K is not a multiple of the group);
    # gemm_applies holds, so this ends at 16 columns or more
    block_k = block_k_within_group(math.gcd(group_size, k), block_k)
    tiles = -(-m // block_m) * -(-n // block_n)
    split_k = 1  # fill the SMs, keeping at least 4 K steps per split
    while tiles * split_k * 2 <= sms and k // (block_k * split_k * 2) >= 4:
        split_k *= 2
    return GemmConfig(
        block_m,
        block_n,
        block_k,
        split_k,
        swap_ab=swap_ab,
        num_warps=num_warps,
        prefetch=prefetch,
        pair_dot=pair_dot and block_k >= 64,  # a ragged K can shrink the step below pair_dot's 64
    )


@dataclass(frozen=True)
class WsConfig:
    """A lut_gemm_ws launch: block_m rows of x by block_n rows of W per program, a ring of `stages`
    shared-memory buffers between its loader, lookup and wgmma warps; K split over split_k programs
    (float32 partial sums, added after) where the tiles alone would leave SMs idle."""

    block_m: int
    block_n: int
    stages: int
    split_k: int = 1
    lookup_warps: int = 4

    def __post_init__(self):
        problems = ws_tile_problems(self.block_m, self.block_n, self.stages, self.split_k, self.lookup_warps)
        if problems:
            raise ValueError("lut_gemm_ws takes " + "; ".join(problems))


@dataclass(frozen=True)
class WsRule:
    """lut_gemm_ws serves min_m <= M <= max_m where N >= min_n, with this launch."""

    min_m: int
    max_m: int
    min_n: int
    block_m: int
    block_n: int
    stages: int
    split_k: int = 1
    lookup_warps: int = 4

    def __post_init__(self):
        WsConfig(self.block_m, self.block_n, self.stages, self.split_k, self.lookup_warps)  # the same tile checks


# device name -> rules, each measured against every other path on that GPU (benchmarks/check_ws_gemm.py).
# Empty: on the H100 it won only at some M of 128-512 and lost from M = 768 on (sweep-gemm-NOTE.md, seventh round).
WS_RULES = {}

WS_BLOCK_K = 64


def ws_layout_problems(x, qdata, lut, scale, zero_point, group_size: int) -> List[str]:
    """What lut_gemm_ws cannot read in these parts, each said in a phrase (empty: it can): x, LUT,
    scale and zero point of one 16-bit dtype, 4-bit codes two per byte, K and the group size
    multiples of WS_BLOCK_K (it steps through K 64 columns at a time within a group); x and the
    codes read by TMA (unit-stride rows, 16-byte aligned base and row stride); the LUT read as
    contiguous 32-bit words; scale and zero point unit-stride rows with one row stride (the kernel
    takes one)."""
    k = x.shape[1]
    problems = []
    if not (x.dtype in (torch.bfloat16, torch.float16) and lut.dtype == scale.dtype == zero_point.dtype == x.dtype):
        problems.append(f"x, LUT, scale and zero point of one 16-bit dtype (got {x.dtype}, {lut.dtype}, {scale.dtype})")
    if lut.shape[1] != 16 or qdata.shape[1] * 2 != k:
        problems.append(f"4-bit codes, two per byte (got a {lut.shape[1]}-entry LUT, {qdata.shape[1]} bytes per row)")
    if k % WS_BLOCK_K or group_size % WS_BLOCK_K:
        problems.append(f"K and the group size multiples of {WS_BLOCK_K} (got K {k}, group {group_size})")
    for name, t in (("x", x), ("qdata", qdata)):
        if t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            problems.append(f"{name} with unit-stride rows, 16-byte aligned (TMA; got strides {tuple(t.stride())})")
    if not lut.is_contiguous() or lut.storage_offset() % 2:
        problems.append("a contiguous LUT starting on a 32-bit boundary")
    if scale.stride(1) != 1 or zero_point.stride(1) != 1 or scale.stride(0) != zero_point.stride(0):
        problems.append(
            f"scale and zero point with unit-stride rows and one row stride (got {tuple(scale.stride())}, "
            f"{tuple(zero_point.stride())})"
        )
    return problems


def ws_tile_problems(block_m: int, block_n: int, stages: int, split_k: int = 1, lookup_warps: int = 4) -> List[str]:
    """The lut_gemm_ws launches that compile without spills and cannot deadlock, as phrases: the
    accumulator (block_m x block_n fp32 over 128 threads) at most 128 registers a thread (256 x 128
    spilled), a wgmma-sized block_m, and a ring of at least 2 slots (with one, the wgmma warps hold
    the only slot while they wait for the next step's W tile: a hang)."""
    problems = []
    if block_n not in (64, 128):
        problems.append(f"block_n 64 or 128 (got {block_n})")
    if block_m not in (64, 128, 256) or block_m * block_n > 128 * 128:
        problems.append(f"block_m 64, 128 or 256 with block_m * block_n <= 128 * 128 (got {block_m} x {block_n})")
    if not (isinstance(stages, int) and stages >= 2):
        problems.append(f"stages >= 2 (got {stages})")
    # ints, not bools or floats: True and 8.0 passed `>= 1` and `in (4, 8)`, then failed in torch.empty
    # or the compiler, after the checks
    if not (type(split_k) is int and split_k >= 1):
        problems.append(f"split_k >= 1 (got {split_k!r})")
    # 8 lookup warps make 16 in all: 128 registers a thread, which a 256-wide wgmma exceeds (ptxas refuses)
    if type(lookup_warps) is not int or lookup_warps not in (4, 8) or (lookup_warps == 8 and block_m > 128):
        problems.append(f"lookup_warps 4, or 8 with block_m <= 128 (got {lookup_warps} with block_m {block_m})")
    return problems


def ws_applies(
    x: torch.Tensor,
    qdata: torch.Tensor,
    lut: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    nbits: int,
    group_size: int,
) -> bool:
    """lut_gemm_ws takes these parts (ws_layout_problems)."""
    return nbits == 4 and not ws_layout_problems(x, qdata, lut, scale, zero_point, group_size)


@_cached
def ws_config(
    m: int, n: int, k: int, group_size: int, name: str, sms: int, capability: Tuple[int, int], cuda: bool
) -> Optional[WsConfig]:
    """The lut_gemm_ws launch for this product, or None. Called as ws_config(m, n, k, group_size, device)."""
    if not cuda or capability[0] != 9:
        return None
    rules = next((r for key, r in WS_RULES.items() if key in name), ())
    rule = next((r for r in rules if r.min_m <= m <= r.max_m and n >= r.min_n), None)
    if rule is None:
        return None
    split_k = rule.split_k if k % (WS_BLOCK_K * rule.split_k) == 0 else 1  # each split takes whole steps
    return WsConfig(rule.block_m, rule.block_n, rule.stages, split_k, rule.lookup_warps)


def permute_dequantize_applies(qdata: torch.Tensor, lut: torch.Tensor, nbits: int, k: int) -> bool:
    """The dequantize kernel's register lookup (lut_permute): nibble-packed codes, a 16-bit LUT,
    K % 8 == 0 and 32-bit aligned rows (from storage offsets: this also runs on fake tensors)."""
    return (
        nbits in (3, 4)
        and lut.dtype in (torch.float16, torch.bfloat16)
        and k % 8 == 0
        and qdata.stride(-1) == 1
        and qdata.stride(0) % 4 == 0
        and qdata.storage_offset() % 4 == 0
        and lut.is_contiguous()
        and lut.storage_offset() % 2 == 0
    )


def choose(
    x: torch.Tensor,
    qdata: torch.Tensor,
    lut: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    nbits: int,
    group_size: int,
) -> Union[MmaConfig, GemmConfig, WsConfig, None]:
    """What torch.ops.any4ao.lut_linear runs: a lut_mma, lut_gemm or lut_gemm_ws config, or None
    for dequantize + mm."""
    if x.shape[0] <= FUSED_MAX_M:
        if not mma_applies(x, qdata, lut, scale, zero_point, nbits, group_size):
            return None
        return mma_config(x.shape[0], qdata.shape[0], x.shape[1], group_size, x.device)
    if WS_RULES and ws_applies(x, qdata, lut, scale, zero_point, nbits, group_size):
        ws = ws_config(x.shape[0], qdata.shape[0], x.shape[1], group_size, x.device)
        if ws is not None:
            return ws
    if not gemm_applies(x, qdata, lut, scale, zero_point, nbits, group_size):
        return None
    return gemm_config(x.shape[0], qdata.shape[0], x.shape[1], group_size, x.device)
