"""Host-side launchers: allocate outputs, compute grids, launch. Which kernel and config a call
gets is decided in selector.py, not here.

The matmul kernel runs inside the opaque custom op any4ao::lut_linear, which torch.compile never
traces into, so it is launched directly. The dequantize kernel is also the body of a triton_op
that inductor traces, so there it launches through `wrap_triton` (lut_dequantize(traceable=True)).
Outside tracing wrap_triton still routes every launch through a higher-order op, which cost about
0.2 ms of host time per launch on the H100 machine (measured with a script since removed), so eager
calls launch directly. The same code runs with TRITON_INTERPRET=1 on CPU tensors.
"""

import os
from typing import Optional

import torch
import triton
from torch.library import wrap_triton

from any4ao.kernels.dequant import dequant_kernel
from any4ao.kernels.lut_gemm import lut_gemm_kernel
from any4ao.kernels.lut_mma import lut_mma_kernel
from any4ao.kernels.selector import (
    WS_BLOCK_K,
    GemmConfig,
    MmaConfig,
    block_k_within_group,
    permute_dequantize_applies,
    ws_layout_problems,
    ws_tile_problems,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _empty(shape, device, dtype):
    """Every output buffer comes from here; tests fill it with NaN to catch unwritten elements."""
    return torch.empty(shape, device=device, dtype=dtype)


def _words_per_step(group_size: int) -> int:
    """lut_mma reads V 32-bit code words per lane and row each step (the 4 lanes of a row: 32 V
    columns, at most 128), with 32 V dividing the group."""
    v = 4
    while v > 1 and group_size % (32 * v):
        v //= 2
    return v


def check_mma_config(config: MmaConfig) -> None:
    if (
        config.block_m not in (8, 16, 32, 64)
        or config.row_tiles not in (1, 2)
        or (config.row_tiles == 2 and config.block_m > 32)
        or config.k_warps < 1
        or config.k_warps & (config.k_warps - 1)
        or config.prefetch not in (1, 2)
        or config.split_k < 1
    ):
        raise ValueError(
            f"lut_mma takes block_m 8, 16, 32 or 64, row_tiles 1 or 2 (2 only with block_m <= 32), "
            f"k_warps a power of two, prefetch 1 or 2 and split_k >= 1; got {config}"
        )


def lut_mma(x, qdata, lut, scale, zero_point, nbits: int, group_size: int, config: MmaConfig) -> torch.Tensor:
    """x (M, K) @ W^T -> (M, N) in x's dtype, on the fused decode kernel (selector.mma_applies holds)."""
    check_mma_config(config)
    m, k = x.shape
    n = qdata.shape[0]
    groups = k // group_size
    out = _empty((config.split_k, m, n), x.device, torch.float32 if config.split_k > 1 else x.dtype)
    # every warp of every split gets the same number of groups: the kernel drops its load predicates
    even = groups % config.split_k == 0 and (groups // config.split_k) % config.k_warps == 0
    grid = (triton.cdiv(n, config.block_n), config.split_k, triton.cdiv(m, config.block_m))
    lut_mma_kernel[grid](
        x.view(torch.int32),
        qdata.view(torch.int32),
        lut.view(torch.int32),
        scale,
        zero_point,
        out,
        M=m,
        N=n,
        K=k,
        stride_xw=x.stride(0) // 2,
        stride_qw=qdata.stride(0) // 4,
        stride_sn=scale.stride(0),
        stride_os=out.stride(0),
        stride_om=out.stride(1),
        pow2_16=1 << 16,
        pow2_31=1 << 31,
        LUT_SIZE=1 << nbits,
        GROUP=group_size,
        V=_words_per_step(group_size),
        ROW_WARPS=1,
        K_WARPS=config.k_warps,
        N_TILES=config.block_m // 8,
        SPLIT_K=config.split_k,
        SPREAD=config.spread,
        LUT_FP16=lut.dtype == torch.float16,
        USE_ASM=not INTERPRET,
        ROW_TILES=config.row_tiles,
        PREFETCH=config.prefetch,
        EVEN=even,
        num_warps=config.k_warps,
        num_stages=3,  # as measured; the loop itself sets num_stages=1
    )
    return out[0] if config.split_k == 1 else out.sum(0).to(x.dtype)


def check_gemm_config(config: GemmConfig, k: int, group_size: int) -> None:
    if (
        config.block_m not in (16, 32, 64, 128, 256)
        or config.block_n not in (16, 32, 64, 128, 256)
        or config.block_k not in (16, 32, 64, 128)
        or group_size % config.block_k
        or k % config.block_k
        or config.split_k < 1
        or config.group_m < 1
    ):
        raise ValueError(
            f"lut_gemm takes block_m and block_n in 16..256, block_k in 16..128 dividing the group size "
            f"({group_size}) and K ({k}), split_k >= 1 and group_m >= 1; got {config}"
        )
    if config.prefetch and config.swap_ab and config.block_n == 256:
        # triton 3.6 on an H200 compiled this one wrong (values of 1e33 with split K, NaN without
        # a visible cause; sweep-gemm-NOTE.md): refused rather than trusted anywhere
        raise ValueError(f"lut_gemm refuses prefetch with swap_ab and block_n = 256 (miscompiled on GPU); got {config}")
    if config.pair_dot and (not config.swap_ab or config.block_k < 64):
        # the looked-up W must be the register operand, and each of a step's 4 dots needs K >= 16
        raise ValueError(f"lut_gemm takes pair_dot only with swap_ab and block_k >= 64; got {config}")


def x_pairs(x: torch.Tensor, block_k: int) -> torch.Tensor:
    """x with the columns of each block_k step reordered for pair_dot: slot q (a quarter of the
    step) holds columns 8j + 2q and 8j + 2q + 1 of word j, for j = 0 .. block_k / 8 - 1."""
    m, k = x.shape
    return x.reshape(m, k // block_k, block_k // 8, 4, 2).transpose(2, 3).reshape(m, k)


def lut_gemm(x, qdata, lut, scale, zero_point, nbits: int, group_size: int, config: GemmConfig) -> torch.Tensor:
    """x (M, K) @ W^T -> (M, N) in x's dtype, on the fused tensor-core LUT GEMM
    (selector.gemm_applies holds)."""
    m, k = x.shape
    check_gemm_config(config, k, group_size)
    n = qdata.shape[0]
    split_k = min(config.split_k, k // config.block_k)
    out = _empty((m, n), x.device, x.dtype)
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    grid = (tiles, split_k)
    # split K: float32 partial sums per split, and a zeroed arrival count per output tile
    part = _empty((split_k, m, n), x.device, torch.float32) if split_k > 1 else out
    counts = torch.zeros(tiles, device=x.device, dtype=torch.int32) if split_k > 1 else None
    pair_fma = config.pair_fma and lut.dtype == x.dtype and scale.dtype == x.dtype == zero_point.dtype
    pair_dot = config.pair_dot and pair_fma
    if pair_dot:
        x = x_pairs(x, config.block_k)
    lut_gemm_kernel[grid](
        x,
        qdata.view(torch.int32),
        lut.view(torch.int32),
        scale,
        zero_point,
        out,
        part,
        counts,
        M=m,
        N=n,
        K=k,
        stride_xm=x.stride(0),
        stride_qw=qdata.stride(0) // 4,
        stride_sn=scale.stride(0),
        stride_os=part.stride(0) if split_k > 1 else 0,
        stride_om=out.stride(0),
        LUT_SIZE=1 << nbits,
        GROUP=group_size,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        SPLIT_K=split_k,
        SWAP_AB=config.swap_ab,
        LUT_FP16=lut.dtype == torch.float16,
        PAIR_FMA=pair_fma,
        USE_ASM=not INTERPRET,
        PREFETCH=config.prefetch,
        INTERPRET=INTERPRET,
        PAIR_DOT=pair_dot,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def lut_dequantize(
    qdata,
    lut,
    scale,
    zero_point,
    nbits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype,
    block_n: Optional[int] = None,
    block_k: int = 128,
    permute: Optional[bool] = None,
    num_warps: int = 4,
    traceable: bool = True,
) -> torch.Tensor:
    """Dense (N, K) weight in `dtype`. permute (default: wherever it applies) looks the LUT up in
    registers (2.0-2.5 TB/s on an H100 against 1.5-1.6 TB/s for the LUT load, sweep v5); otherwise
    the LUT is read by a gather load. traceable: launch through wrap_triton (inside the triton_op
    any4ao::dequantize); the opaque lut_linear passes False."""
    n = qdata.shape[0]
    block_k = block_k_within_group(group_size, block_k)
    if permute is None:
        permute = permute_dequantize_applies(qdata, lut, nbits, in_features) and block_k >= 8
    # H100: BLOCK_N 32 suits the permute path (sweep v5); the LUT-load path is fastest at 16
    block_n = block_n or (32 if permute else 16)
    out = _empty((n, in_features), qdata.device, dtype)
    grid = (triton.cdiv(n, block_n), triton.cdiv(in_features, block_k))
    if permute:  # codes and LUT read as 32-bit words
        q, table, stride_q = qdata.view(torch.int32), lut.view(torch.int32), qdata.stride(0) // 4
    else:
        q, table, stride_q = qdata, lut, qdata.stride(0)
    kernel = wrap_triton(dequant_kernel) if traceable else dequant_kernel
    kernel[grid](
        q,
        table,
        scale,
        zero_point,
        out,
        n,
        in_features,
        stride_q,
        scale.stride(0),
        out.stride(0),
        NBITS=nbits,
        GROUP=group_size,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PERMUTE=bool(permute),
        LUT_FP16=lut.dtype == torch.float16,
        USE_ASM=not INTERPRET,
        num_warps=num_warps,
    )
    return out


def dequantize_then_mm(x, qdata, lut, scale, zero_point, nbits: int, group_size: int) -> torch.Tensor:
    """x @ W^T with W dequantized once to x's dtype (the Triton dequantize kernel), then cuBLAS."""
    w = lut_dequantize(qdata, lut, scale, zero_point, nbits, group_size, x.shape[1], x.dtype, traceable=False)
    return torch.mm(x, w.t())


def lut_gemm_ws(
    x,
    qdata,
    lut,
    scale,
    zero_point,
    group_size: int,
    block_m=128,
    block_n=128,
    stages=4,
    split_k=1,
    lookup_warps=4,
    lookup_regs=None,
) -> torch.Tensor:
    """x (M, K) @ W^T -> (M, N) on the warp-specialised Gluon kernel (Hopper; lut_gemm_ws.py says
    which layouts it takes). split_k > 1: each program sums K / split_k columns into float32 partial
    sums, added here. lookup_warps 8 halves each lookup thread's share of a W tile (registers:
    lut_gemm_ws.LOOKUP_REGISTERS unless lookup_regs says). Gluon is imported here: CPU machines never load it."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from any4ao.kernels.lut_gemm_ws import LOOKUP_REGISTERS, lut_gemm_ws_kernel, tile_layouts

    x = x.contiguous()
    problems = ws_layout_problems(x, qdata, lut, scale, zero_point, group_size)
    problems += ws_tile_problems(block_m, block_n, stages, split_k, lookup_warps)
    m, k = x.shape
    if not problems and k % (WS_BLOCK_K * split_k):
        problems.append(f"K a multiple of {WS_BLOCK_K} x split_k (got K {k}, split_k {split_k})")
    if problems:
        raise ValueError("lut_gemm_ws takes " + "; ".join(problems))
    n = qdata.shape[0]
    x_layout, q_layout = tile_layouts()
    x_desc = TensorDescriptor.from_tensor(x, [block_m, WS_BLOCK_K], x_layout)
    q_desc = TensorDescriptor.from_tensor(qdata, [block_n, WS_BLOCK_K // 2], q_layout)
    out = _empty((split_k, m, n), x.device, torch.float32 if split_k > 1 else x.dtype)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), split_k)
    lut_gemm_ws_kernel[grid](
        x_desc,
        q_desc,
        lut.view(torch.int32),
        scale,
        zero_point,
        out,
        m,
        n,
        k,
        scale.stride(0),
        out.stride(1),
        out.stride(0),
        GROUP=group_size,
        BLOCK_N=block_n,
        STAGES=stages,
        SPLIT_K=split_k,
        FP16=x.dtype == torch.float16,
        LOOKUP_REGS=lookup_regs or LOOKUP_REGISTERS[lookup_warps],
        LOOKUP_WARPS=lookup_warps,
        num_warps=4,
    )
    return out[0] if split_k == 1 else out.sum(0).to(x.dtype)
