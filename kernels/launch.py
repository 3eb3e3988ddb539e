"""Host-side launchers: pick block shapes, allocate outputs, launch. The matmul kernels run inside
the opaque custom op any4ao::lut_linear, which torch.compile never traces into, so they are
launched directly; the dequantize kernel is also the body of a triton_op that inductor traces, so
it launches through `wrap_triton` there (lut_dequantize(traceable=True)). The same code runs with
TRITON_INTERPRET=1 on CPU tensors."""

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
from torch.library import wrap_triton

from any4ao.kernels.dequant import dequant_kernel
from any4ao.kernels.lut_decode import lut_decode_kernel
from any4ao.kernels.lut_gemm import lut_gemm_kernel
from any4ao.kernels.lut_gemv import lut_gemv_kernel
from any4ao.kernels.lut_mma import lut_mma_kernel
from any4ao.kernels.lut_tile import LUT_REGISTER

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _launcher(kernel, traceable: bool = False):
    """The kernel itself, or wrapped by wrap_triton where a triton_op body must be traceable. Outside
    tracing wrap_triton still routes each launch through a higher-order op (pytree flattening,
    signature binding): about 0.22 ms of host time per launch on the H100 machine's CPU (an
    M=1 4096x4096 call took 386 us with it, 167 us without: benchmarks/bench_op_overhead.py),
    about 20x the decode kernel's GPU time."""
    return wrap_triton(kernel) if traceable else kernel


def _empty(shape, device, dtype):
    """Every output buffer comes from here; tests fill it with NaN to catch unwritten elements."""
    return torch.empty(shape, device=device, dtype=dtype)


@dataclass(frozen=True)
class KernelConfig:
    # "decode-mma": lut_mma (register LUT feeding warp-level mma.sync; block_n = 16 x row tiles x
    # row warps, block_m = 8 x n-tiles, block_k = K columns per step and row, num_warps = row warps x k_warps);
    # "decode-fma" / "decode-dot": lut_decode (register LUT, CUDA-core FMAs or tl.dot);
    # "gemv" / "gemm": lut_gemv / lut_gemm (LUT by load, select or tl.gather: lut_mode).
    kind: str
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    lut_mode: int = 0  # lut_tile.LUT_LOAD / LUT_SELECT / LUT_REGISTER (gemv / gemm only)
    k_warps: int = 1  # decode-mma: warps of a program that split its K range (summed in shared memory)
    maxnreg: Optional[int] = None  # decode-mma: register cap per thread (ptxas), for occupancy
    scaled_a: bool = False  # decode-mma: scales and zeros applied to the A fragments (lut_mma SCALED_A)
    spread: bool = False  # decode-mma: a lane's words of a step 4 apart (lut_mma SPREAD)
    row_tiles: int = 1  # decode-mma: 16-row weight tiles per warp (2: each x fragment feeds two mmas)
    prefetch: int = 0  # decode-mma: 0 = codes pipelined through shared memory (num_stages); 1, 2 = loaded
    # that many steps ahead straight into registers (lut_mma PREFETCH)


def permute_lookup_applies(qdata: torch.Tensor, lut: torch.Tensor, nbits: int, k: int,
                           check_pointers: bool = False) -> bool:
    """lut_permute's register lookup reads codes as 32-bit words and the LUT as pairs of 16-bit
    entries: nibble-packed codes (3 or 4 bits), K % 8 == 0, 4-byte aligned rows, a 16-bit LUT.
    Alignment comes from storage offsets (this also runs on fake tensors under compile, where
    allocations are aligned); check_pointers also checks the addresses (real tensors only)."""
    ok = (
        nbits in (3, 4)
        and lut.dtype in (torch.float16, torch.bfloat16)
        and k % 8 == 0
        and qdata.stride(-1) == 1 and qdata.stride(0) % 4 == 0 and qdata.storage_offset() % 4 == 0
        and lut.is_contiguous() and lut.storage_offset() % 2 == 0
    )
    return ok and (not check_pointers or (qdata.data_ptr() % 4 == 0 and lut.data_ptr() % 4 == 0))


def mma_applies(x: torch.Tensor, qdata: torch.Tensor, lut: torch.Tensor, nbits: int, group_size: int,
                scales: Optional[torch.Tensor] = None, zeros: Optional[torch.Tensor] = None) -> bool:
    """lut_mma on top of permute_lookup_applies: x in the LUT's dtype (the looked-up values go into
    the mma as they are), read 16 bytes at a time (16-byte aligned rows), whole groups of a multiple
    of 32 columns; scales and zeros, where given, in the LUT's dtype too (read as 16-bit bits)."""
    k = x.shape[1]
    return (
        permute_lookup_applies(qdata, lut, nbits, k, check_pointers=True)
        and x.dtype == lut.dtype and x.stride(1) == 1 and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0
        and group_size % 32 == 0 and k % group_size == 0
        and all(t is None or t.dtype == lut.dtype for t in (scales, zeros))
    )


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _split_k(tiles: int, k_blocks: int, want_programs: int, min_blocks_per_split: int = 2) -> int:
    """K-splits so the grid has about `want_programs` programs, keeping >= min_blocks_per_split K
    blocks per split so the fp32 workspace stays small next to the weight stream."""
    want = max(1, -(-want_programs // tiles))
    return max(1, min(want, k_blocks // min_blocks_per_split, 8))


def _k_warps(programs: int, groups: int, sms: int, warps_per_sm: int, lo: int, hi: int) -> int:
    """K warps per program: the most in lo..hi (powers of two, at most one per group) that keep
    the grid within warps_per_sm warps per SM."""
    k_warps = 1
    while 2 * k_warps <= min(lo, groups):
        k_warps *= 2
    while 2 * k_warps <= min(hi, groups) and programs * 2 * k_warps <= warps_per_sm * sms:
        k_warps *= 2
    return k_warps


def choose_config(m: int, n: int, k: int, device: torch.device, group_size: int = 128) -> KernelConfig:
    """M <= 64 (ops.py sends larger M to dequantize + cuBLAS): lut_mma, the register LUT feeding
    tensor cores, with the scales applied to the fragments (scaled_a; faster at every M in sweeps
    v10, v11); lut_matmul falls back to register_lut_config / gather_config where it does not
    apply (mma_applies, permute_lookup_applies).

    Fitted to the H100 sweep v14 (benchmarks/results/sweep-H100-v14-prefetch.json: 7 shapes, N
    1024-28672, K 4096-14336, M 1, 8, 16, 32, 64, every combination of K warps 1-8, row tiles,
    prefetch 0 / 1 / 2 and spread; geometric mean of time over that shape's best config: 1.004,
    1.003, 1.014, 1.035, 1.013 at M = 1, 8, 16, 32, 64, worst 1.17). The choices:
    - code loads: prefetched in registers (no shared memory, no barriers between the warps of a
      program), 2 steps ahead where a warp needs more loads in flight: at M <= 8 with few
      programs (N <= 2 x SMs x 16 rows), at M 9-16 with one row tile, and above M = 16;
    - rows of x per program: 8 (M <= 8), 16 (M <= 16), else 32 from N = 2048 (with two row
      tiles always; M > 32 with one row tile: 16);
    - row tiles: two 16-row weight tiles per warp (each x fragment feeds two mmas, halving the x
      traffic through L1) at M 9-16 from N = 8192 and above M = 16 from N = 4096; one at M <= 8,
      where the lookup is the bound; spread word order with one row tile above M = 16;
    - K warps: as many as keep the grid within 24 warps per SM at M <= 8 (at least 4), 16 at M
      9-16 with one row tile, 8 otherwise (at least 2 at M 9-16 with two: one-warp programs
      there timed 53.6, 56.3 and 63.8 us on 28672x4096 in three runs on different machines,
      two and four warps 50.8-54.7); at most 8 (4 above M = 16). Short of that, latency stays
      unhidden; past it, a second wave of programs or SMs idling on the slowest warps of a
      program. These are
      thresholds fitted to seven shapes; the best K-warp count is not monotone in N (wave
      quantization, not modelled)."""
    groups = max(k // group_size, 1)
    sms = _num_sms(device)
    if m <= 8:
        bm, row_tiles, spread = 8, 1, False
        programs = triton.cdiv(n, 16)
        k_warps = _k_warps(programs, groups, sms, 24, 4, 8)
        prefetch = 2 if programs <= 2 * sms else 1
    elif m <= 16:
        bm, row_tiles, spread = 16, (2 if n >= 8192 else 1), False
        programs = triton.cdiv(n, 16 * row_tiles)
        if row_tiles == 2:
            k_warps, prefetch = _k_warps(programs, groups, sms, 8, 2, 8), 1
        else:
            k_warps, prefetch = _k_warps(programs, groups, sms, 16, 1, 8), 2
    elif m <= 64:
        row_tiles = 2 if n >= 4096 else 1
        bm = 32 if row_tiles == 2 or (n >= 2048 and m <= 32) else 16
        spread, prefetch = row_tiles == 1, 2
        programs = triton.cdiv(n, 16 * row_tiles) * triton.cdiv(m, bm)
        k_warps = _k_warps(programs, groups, sms, 8, 1, 4)
    else:
        return register_lut_config(m, n, k, device)
    return KernelConfig("decode-mma", bm, 16 * row_tiles, 128, 1, num_warps=k_warps, num_stages=3, k_warps=k_warps,
                        scaled_a=True, spread=spread, row_tiles=row_tiles, prefetch=prefetch)


def register_lut_config(m: int, n: int, k: int, device: torch.device) -> KernelConfig:
    """Block shapes from the H100 sweeps (bench_kernels.py --sweep-only; the last one is
    benchmarks/results/sweep-H100-v5-register-lut.json).

    M <= 16 where lut_mma does not apply runs lut_decode, whose LUT lookup stays in registers.
    M=1: CUDA-core FMAs, BLOCK_N=32, BLOCK_K=256, 2 warps, 3 stages, split-K to about 8 programs
    per SM; within 10 % of the sweep's best on 4096x4096, 28672x4096 and 8192x8192 (14.4-15.6 /
    53.8 / 41.7 us against bests of 14.3 / 53.8 / 38.0). M=2..16: the tensor-core variant,
    BLOCK_M=16, BLOCK_N=128, 4 warps, split-K to about 8 programs per SM."""
    sms = _num_sms(device)
    if m == 1:
        split = _split_k(triton.cdiv(n, 32), triton.cdiv(k, 256), 8 * sms, 1)
        return KernelConfig("decode-fma", 1, 32, 256, split, num_warps=2, num_stages=3)
    if m <= 16:
        split = _split_k(triton.cdiv(n, 128), triton.cdiv(k, 128), 8 * sms)
        return KernelConfig("decode-dot", 16, 128, 128, split, num_warps=4, num_stages=3)
    block_m = 32 if m <= 32 else 64 if m <= 64 else 128
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, 128)
    split = _split_k(tiles, triton.cdiv(k, 128), 2 * sms) if tiles < sms else 1
    return KernelConfig("gemm", block_m, 128, 128, split, num_warps=8, num_stages=3)


def gather_config(m: int, n: int, k: int, device: torch.device) -> KernelConfig:
    """Small M where lut_decode does not apply: the BM=16 tensor-core GEMM with the LUT gathered
    from a register tile. BLOCK_N=128 with split-K 8 won the H100 sweep for that kernel
    (sweep-H100-v4-gemm-m1-m16.json: 28672x4096 M=1 180.7 vs 194.5 us at BLOCK_N=64)."""
    split = _split_k(triton.cdiv(n, 128), triton.cdiv(k, 128), 12 * _num_sms(device))
    return KernelConfig("gemm", 16, 128, 128, split, num_warps=4, num_stages=3, lut_mode=LUT_REGISTER)


def block_k_for(group_size: int, block_k: int) -> int:
    """Largest block_k / 2**i dividing the group size, so a K block never straddles two groups."""
    while group_size % block_k:
        block_k //= 2
    return block_k


def dequantize_then_mm(x, qdata, lut, scales, zeros, nbits: int, group_size: int):
    """x @ W^T with W dequantized once to x's dtype (the Triton dequantize kernel), then cuBLAS."""
    w = lut_dequantize(qdata, lut, scales, zeros, nbits, group_size, x.shape[1], x.dtype, traceable=False)
    return torch.mm(x, w.t())


def lut_matmul(x, qdata, lut, scales, zeros, nbits: int, group_size: int, config: Optional[KernelConfig] = None):
    """out[m, n] = sum_k x[m, k] * W[n, k] for a 2-D x (M, K); out has x's dtype."""
    m, k = x.shape
    n = qdata.shape[0]
    x = x.contiguous()
    config = config or choose_config(m, n, k, x.device, group_size)
    if config.kind == "decode-mma" and not mma_applies(x, qdata, lut, nbits, group_size, scales, zeros):
        if m > 16:  # above 16 rows the previous kernels lose to dequantize + cuBLAS
            return dequantize_then_mm(x, qdata, lut, scales, zeros, nbits, group_size)
        config = register_lut_config(m, n, k, x.device)
    # decode-fma applies scales per CHUNK columns, so any block size works; decode-mma steps through
    # whole groups; the others keep a K block inside one group.
    block_k = config.block_k if config.kind in ("decode-fma", "decode-mma") else block_k_for(group_size, config.block_k)
    if config.kind in ("decode-fma", "decode-dot") and not (
        permute_lookup_applies(qdata, lut, nbits, k, check_pointers=True)
        and block_k >= (16 if config.kind == "decode-dot" else 8)
        and group_size % 8 == 0
    ):
        config = gather_config(m, n, k, x.device)
        block_k = block_k_for(group_size, config.block_k)
    per_byte = 4 if nbits == 2 else 2
    if config.kind == "gemm" and block_k // per_byte < 16:
        # tl.dot needs K >= 16 per phase; groups this small (G=16, 48, ...) take dequantize + mm.
        return dequantize_then_mm(x, qdata, lut, scales, zeros, nbits, group_size)
    workspace = _empty((config.split_k, m, n), x.device, torch.float32 if config.split_k > 1 else x.dtype)
    if config.kind == "decode-mma":
        _launch_mma(x, qdata, lut, scales, zeros, workspace, nbits, group_size, config)
    elif config.kind.startswith("decode"):
        _launch_decode(x, qdata, lut, scales, zeros, workspace, nbits, group_size, config, block_k)
    else:
        common = dict(
            M=m, N=n, K=k,
            stride_xm=x.stride(0), stride_qn=qdata.stride(0), stride_sn=scales.stride(0),
            stride_os=workspace.stride(0), stride_om=workspace.stride(1),
            NBITS=nbits, GROUP=group_size,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=block_k, SPLIT_K=config.split_k,
            LUT_MODE=config.lut_mode,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
        if config.kind == "gemv":
            grid = (triton.cdiv(n, config.block_n), config.split_k)
            _launcher(lut_gemv_kernel)[grid](x, qdata, lut, scales, zeros, workspace, **common)
        else:
            grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n), config.split_k)
            _launcher(lut_gemm_kernel)[grid](x, qdata, lut, scales, zeros, workspace, **common, GROUP_M=8,
                                               DOT_FP32=INTERPRET)
    if config.split_k == 1:
        return workspace[0]
    return workspace.sum(0).to(x.dtype)


def _words_per_step(group_size: int, block_k: int) -> int:
    """lut_mma reads V 32-bit code words per lane and row each step (the 4 lanes of a row: 32 V
    columns, block_k at most), with 32 V dividing the group."""
    v = 4
    while v > 1 and (32 * v > block_k or group_size % (32 * v)):
        v //= 2
    return v


def _launch_mma(x, qdata, lut, scales, zeros, workspace, nbits, group_size, config):
    rows = 16 * config.row_tiles  # weight rows per warp
    if (config.block_m not in (8, 16, 32, 64) or (config.block_m == 64 and not config.scaled_a)
            or config.row_tiles not in (1, 2) or (config.row_tiles == 2 and (not config.scaled_a or config.block_m > 32))
            or config.block_n % rows or config.block_n < rows or config.k_warps < 1 or config.prefetch not in (0, 1, 2)):
        raise ValueError(f"decode-mma takes block_m 8, 16, 32 (64 only with scaled_a), row_tiles 1 or 2 (2 only "
                         f"with scaled_a and block_m <= 32), block_n a multiple of 16 x row_tiles, k_warps >= 1 and "
                         f"prefetch 0, 1 or 2; got {config}")
    m, k = x.shape
    n = qdata.shape[0]
    row_warps = config.block_n // rows
    groups = k // group_size
    # every warp of every split gets the same number of groups: the kernel drops its load predicates
    even = groups % config.split_k == 0 and (groups // config.split_k) % config.k_warps == 0
    grid = (triton.cdiv(n, config.block_n), config.split_k, triton.cdiv(m, config.block_m))
    _launcher(lut_mma_kernel)[grid](
        x.view(torch.int32), qdata.view(torch.int32), lut.view(torch.int32), scales, zeros, workspace,
        M=m, N=n, K=k,
        stride_xw=x.stride(0) // 2, stride_qw=qdata.stride(0) // 4, stride_sn=scales.stride(0),
        stride_os=workspace.stride(0), stride_om=workspace.stride(1), pow2_16=1 << 16, pow2_31=1 << 31,
        LUT_SIZE=1 << nbits, GROUP=group_size,
        V=_words_per_step(group_size, config.block_k),
        ROW_WARPS=row_warps, K_WARPS=config.k_warps, N_TILES=config.block_m // 8, SPLIT_K=config.split_k,
        SCALED_A=config.scaled_a, SPREAD=config.spread, LUT_FP16=lut.dtype == torch.float16,
        USE_ASM=not INTERPRET, STAGES=config.num_stages, ROW_TILES=config.row_tiles, PREFETCH=config.prefetch,
        EVEN=even, num_warps=row_warps * config.k_warps, num_stages=config.num_stages,
        **({"maxnreg": config.maxnreg} if config.maxnreg and not INTERPRET else {}),
    )


def _launch_decode(x, qdata, lut, scales, zeros, workspace, nbits, group_size, config, block_k):
    m, k = x.shape
    n = qdata.shape[0]
    grid = (triton.cdiv(n, config.block_n), config.split_k, triton.cdiv(m, config.block_m))
    _launcher(lut_decode_kernel)[grid](
        x, qdata.view(torch.int32), lut.view(torch.int32), scales, zeros, workspace,
        M=m, N=n, K=k,
        stride_xm=x.stride(0), stride_qw=qdata.stride(0) // 4, stride_sn=scales.stride(0),
        stride_os=workspace.stride(0), stride_om=workspace.stride(1),
        LUT_SIZE=1 << nbits, GROUP=group_size,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=block_k, SPLIT_K=config.split_k,
        LUT_FP16=lut.dtype == torch.float16, USE_DOT=config.kind == "decode-dot",
        DOT_FP32=INTERPRET, USE_ASM=not INTERPRET, CHUNK=min(block_k, 32, group_size & -group_size), STAGES=config.num_stages,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def lut_dequantize(qdata, lut, scales, zeros, nbits: int, group_size: int, in_features: int, dtype: torch.dtype,
                   block_n: Optional[int] = None, block_k: int = 128, lut_mode: int = 0,
                   permute: Optional[bool] = None, num_warps: int = 4, traceable: bool = True):
    """Dense (N, K) weight in `dtype`. permute (default: wherever it applies) looks the LUT up in
    registers (dequant_kernel with PERMUTE: 2.0-2.5 TB/s on an H100 against 1.5-1.6 TB/s for the LUT
    load, sweep-H100-v5-register-lut.json); otherwise the LUT is read by lut_mode. traceable: launch
    through wrap_triton (the triton_op any4ao::dequantize); the opaque lut_linear passes False."""
    n = qdata.shape[0]
    block_k = block_k_for(group_size, block_k)
    if permute is None:
        permute = permute_lookup_applies(qdata, lut, nbits, in_features) and block_k >= 8
    # H100: BLOCK_N 32 suits the permute path (sweep v5); the LUT-load path ran 20 % slower at 32
    # than at its own 16 (29.5 vs 35.4 us on 4096x4096).
    block_n = block_n or (32 if permute else 16)
    out = _empty((n, in_features), qdata.device, dtype)
    grid = (triton.cdiv(n, block_n), triton.cdiv(in_features, block_k))
    if permute:  # codes and LUT read as 32-bit words
        q, table, stride_q = qdata.view(torch.int32), lut.view(torch.int32), qdata.stride(0) // 4
    else:
        q, table, stride_q = qdata, lut, qdata.stride(0)
    _launcher(dequant_kernel, traceable)[grid](
        q, table, scales, zeros, out, n, in_features,
        stride_q, scales.stride(0), out.stride(0),
        NBITS=nbits, GROUP=group_size, BLOCK_N=block_n, BLOCK_K=block_k, LUT_MODE=lut_mode,
        PERMUTE=bool(permute), LUT_FP16=lut.dtype == torch.float16, USE_ASM=not INTERPRET, num_warps=num_warps,
    )
    return out
