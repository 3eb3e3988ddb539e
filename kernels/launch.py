"""Host-side launchers: pick block shapes, allocate outputs, launch through `wrap_triton` so the
same code runs eagerly, inside `torch.library.triton_op` under torch.compile, and (with
TRITON_INTERPRET=1) on CPU tensors."""

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
from torch.library import wrap_triton

from any4ao.kernels.dequant import dequant_kernel
from any4ao.kernels.lut_gemm import lut_gemm_kernel
from any4ao.kernels.lut_gemv import lut_gemv_kernel
from any4ao.kernels.lut_tile import LUT_REGISTER

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _empty(shape, device, dtype):
    """Every output buffer comes from here; tests fill it with NaN to catch unwritten elements."""
    return torch.empty(shape, device=device, dtype=dtype)


@dataclass(frozen=True)
class KernelConfig:
    kind: str  # "gemv" or "gemm"
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    lut_mode: int = 0  # lut_tile.LUT_LOAD / LUT_SELECT / LUT_REGISTER


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _split_k(tiles: int, k_blocks: int, want_programs: int, min_blocks_per_split: int = 2) -> int:
    """K-splits so the grid has about `want_programs` programs, keeping >= min_blocks_per_split K
    blocks per split so the fp32 workspace stays small next to the weight stream."""
    want = max(1, -(-want_programs // tiles))
    return max(1, min(want, k_blocks // min_blocks_per_split, 8))


def choose_config(m: int, n: int, k: int, device: torch.device) -> KernelConfig:
    """Block shapes from the H100 sweeps in benchmarks/results (bench_kernels.py --sweep).

    Every M the fused path serves (<= 16; ops.py sends larger M to dequantize + cuBLAS) runs the
    BM=16 tensor-core GEMM with the LUT gathered from registers: in the second sweep it beat the
    GEMV kernel at M=4 by 2.8-3.2x, and at M=4 it was already faster than the GEMV at M=1
    (4096x4096: 36.7 vs 44.9 us). The GEMV kernel stays available through an explicit config.
    BLOCK_N=128 (with split-K 8 on the Llama shapes) beat BLOCK_N=64 by 7-21% at M=1 and M=16 in the
    third sweep (sweep-H100-v4-gemm-m1-m16.json: 28672x4096 M=1 180.7 vs 194.5 us)."""
    sms = _num_sms(device)
    if m <= 16:
        tiles = triton.cdiv(n, 128)
        split = _split_k(tiles, triton.cdiv(k, 128), 12 * sms)
        return KernelConfig("gemm", 16, 128, 128, split, num_warps=4, num_stages=3, lut_mode=LUT_REGISTER)
    block_m = 32 if m <= 32 else 64 if m <= 64 else 128
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, 128)
    split = _split_k(tiles, triton.cdiv(k, 128), 2 * sms) if tiles < sms else 1
    return KernelConfig("gemm", block_m, 128, 128, split, num_warps=8, num_stages=3)


def block_k_for(group_size: int, block_k: int) -> int:
    """Largest block_k / 2**i dividing the group size, so a K block never straddles two groups."""
    while group_size % block_k:
        block_k //= 2
    return block_k


def lut_matmul(x, qdata, lut, scales, zeros, nbits: int, group_size: int, config: Optional[KernelConfig] = None):
    """out[m, n] = sum_k x[m, k] * W[n, k] for a 2-D x (M, K); out has x's dtype."""
    m, k = x.shape
    n = qdata.shape[0]
    x = x.contiguous()
    config = config or choose_config(m, n, k, x.device)
    block_k = block_k_for(group_size, config.block_k)
    per_byte = 4 if nbits == 2 else 2
    if config.kind == "gemm" and block_k // per_byte < 16:
        # tl.dot needs K >= 16 per phase; groups this small (G=16, 48, ...) take dequantize + mm.
        w = lut_dequantize(qdata, lut, scales, zeros, nbits, group_size, k, x.dtype)
        return torch.mm(x, w.t())
    workspace = _empty((config.split_k, m, n), x.device, torch.float32 if config.split_k > 1 else x.dtype)
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
        wrap_triton(lut_gemv_kernel)[grid](x, qdata, lut, scales, zeros, workspace, **common)
    else:
        grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n), config.split_k)
        wrap_triton(lut_gemm_kernel)[grid](x, qdata, lut, scales, zeros, workspace, **common, GROUP_M=8, DOT_FP32=INTERPRET)
    if config.split_k == 1:
        return workspace[0]
    return workspace.sum(0).to(x.dtype)


def lut_dequantize(qdata, lut, scales, zeros, nbits: int, group_size: int, in_features: int, dtype: torch.dtype,
                   block_n: int = 16, block_k: int = 128, lut_mode: int = 0):
    """Dense (N, K) weight in `dtype`."""
    n = qdata.shape[0]
    block_k = block_k_for(group_size, block_k)
    out = _empty((n, in_features), qdata.device, dtype)
    grid = (triton.cdiv(n, block_n), triton.cdiv(in_features, block_k))
    wrap_triton(dequant_kernel)[grid](
        qdata, lut, scales, zeros, out, n, in_features,
        qdata.stride(0), scales.stride(0), out.stride(0),
        NBITS=nbits, GROUP=group_size, BLOCK_N=block_n, BLOCK_K=block_k, LUT_MODE=lut_mode,
    )
    return out
