"""GPTQ-style error feedback with learned per-row LUTs (Frantar et al., 2023, applied to any4).

The LUTs and group scales/zeros are learned first (quantize.py). Codes are then chosen one input
channel (column) at a time: each column's rounding error is spread over the columns not yet
quantized through the inverse Hessian of the layer inputs, H = E[x x^T], so the layer's output
error E||(W - W_hat) x||^2 -- not the weight error -- is what the choice of codes minimises.
All rows advance together (one column step is a handful of tensor ops over the N rows), in
blocks of columns with the lazy batched update of the GPTQ paper.

The objective tr((W - W_hat) H (W - W_hat)^T) is a sum over rows, so each row finally keeps
whichever of GPTQ's codes and the nearest-entry codes has the lower output error: error feedback
never makes a row worse than plain rounding under the (undamped) Hessian.
"""

import torch

from any4ao.codebooks.group_scaling import expand_groups, to_code_domain
from any4ao.codebooks.kmeans import nearest_code

BLOCK_COLUMNS = 128
MAX_DAMP_RETRIES = 4


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; unused inputs (H_kk = 0) get
    H_kk = 1. Dampening grows x10 while the factorisation fails (near-singular H)."""
    h = hessian.clone()
    diag = torch.diagonal(h)
    dead = diag <= 0
    diag[dead] = 1.0
    mean = float(diag.mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(MAX_DAMP_RETRIES):
        lower, info = torch.linalg.cholesky_ex(h + (damp * 10**attempt) * mean * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError(
        f"the layer-input Hessian is not positive definite even with dampening {damp * 10**attempt:g}: "
        f"raise gptq_damp (now {damp:g})"
    )


def _row_output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    e = (w - w_hat).to(hessian.dtype)
    return ((e @ hessian) * e).sum(1)


def dequantize_codes(codes, lut, scales, zeros, group_size: int) -> torch.Tensor:
    k = codes.shape[1]
    values = torch.gather(lut, 1, codes.long())
    return values * expand_groups(scales, k, group_size) + expand_groups(zeros, k, group_size)


def _block_torch(work, upper, lut, boundaries, s_full, z_full, codes, errors, i1: int, i2: int) -> None:
    """GPTQ's column loop over columns i1..i2, in torch (the reference the fused kernel is tested
    against, and the CPU path)."""
    block = work[:, i1:i2].clone()
    u = upper[i1:i2, i1:i2]
    for j in range(i2 - i1):
        col, s, z = block[:, j], s_full[:, i1 + j], z_full[:, i1 + j]
        x = torch.where(s > 0, (col - z) / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(col))
        code = (x[:, None] > boundaries).sum(1)
        q = lut.gather(1, code[:, None])[:, 0] * s + z
        err = (col - q) / u[j, j]
        block[:, j:] -= err[:, None] * u[j, j:][None, :]
        errors[:, j] = err
        codes[:, i1 + j] = code.to(torch.uint8)


def _fused_available(w: torch.Tensor, num_entries: int) -> bool:
    if not w.is_cuda or num_entries > 16:
        return False
    try:
        import any4ao.kernels.gptq  # noqa: F401  (triton is a Linux-only dependency)
    except ImportError:
        return False
    return True


def gptq_codes(w, hessian, lut, scales, zeros, group_size: int, damp: float, nearest=None, fused=None) -> torch.Tensor:
    """(N, K) uint8 codes for float32 `w` (N, K) with fixed float32 `lut` (N, C) sorted per row,
    `scales`/`zeros` (N, ceil(K/G)); `hessian` (K, K). `nearest`: the nearest-entry codes (the
    per-row fallback; computed here if not given). fused: each block of columns in one Triton
    kernel (any4ao.kernels.gptq; default on CUDA), else the torch loop."""
    n, k = w.shape
    if hessian.shape != (k, k):
        raise ValueError(
            f"Hessian has shape {tuple(hessian.shape)}, expected ({k}, {k}) for a weight of shape {(n, k)}"
        )
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("the layer-input Hessian has NaN or Inf entries")
    if fused is None:
        fused = _fused_available(w, lut.shape[1])
    # float64 on the CPU (cheap there); float32 on GPUs and in the fused kernel, as GPTQ itself
    compute = torch.float32 if fused or w.device.type != "cpu" else torch.float64
    hessian = hessian.to(device=w.device, dtype=compute)
    upper = _inverse_cholesky(hessian, damp).contiguous()
    work = w.to(compute).clone()
    lut_c = lut.to(compute).contiguous()
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    errors = torch.empty(n, BLOCK_COLUMNS, dtype=compute, device=w.device)
    if fused:
        from any4ao.kernels.gptq import gptq_block

        s_groups, z_groups = scales.to(compute).contiguous(), zeros.to(compute).contiguous()
    else:
        s_full = expand_groups(scales, k, group_size).to(compute)
        z_full = expand_groups(zeros, k, group_size).to(compute)
        boundaries = (lut_c[:, 1:] + lut_c[:, :-1]) * 0.5
    for i1 in range(0, k, BLOCK_COLUMNS):
        i2 = min(i1 + BLOCK_COLUMNS, k)
        if fused:
            gptq_block(work, upper, lut_c, s_groups, z_groups, codes, errors, i1, i2, group_size)
        else:
            _block_torch(work, upper, lut_c, boundaries, s_full, z_full, codes, errors, i1, i2)
        work[:, i2:] -= errors[:, : i2 - i1] @ upper[i1:i2, i2:]
    if nearest is None:
        nearest = nearest_code(to_code_domain(w, scales, zeros, group_size), lut)
    fed_back = _row_output_error(w, dequantize_codes(codes, lut, scales, zeros, group_size), hessian)
    rounded = _row_output_error(w, dequantize_codes(nearest, lut, scales, zeros, group_size), hessian)
    return torch.where((fed_back <= rounded)[:, None], codes, nearest.to(torch.uint8))
