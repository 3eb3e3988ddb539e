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

The LUTs were fitted to the weights before any code moved; with the codes fixed, each row's LUT
that minimises the same output error is a C x C least-squares solve (refit_luts, the codebook
update of GPTVQ, van Baalen et al., 2024). A row keeps its refitted LUT only where that lowers
its output error and dequantizes within the storage dtype.
"""

import torch

from any4ao.codebooks.group_scaling import expand_groups, to_code_domain
from any4ao.codebooks.kmeans import nearest_code

BLOCK_COLUMNS = 128
REFIT_CHUNK_ELEMENTS = 2**24  # rows x K x C of the one-hot tensor refit_luts builds per chunk
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


def refit_luts(w, hessian, codes, lut, scales, zeros, group_size: int, dtype: torch.dtype, damp: float):
    """(codes, lut): for each row the LUT that minimises its output error (w - w_hat) H (w - w_hat)^T
    with the codes and group scales/zeros fixed, rounded to `dtype` and sorted (codes renumbered to
    match); rows where that is not lower than with `lut` (float32, sorted), or would not dequantize
    within `dtype`, keep theirs. With w_hat = s * L[c] + z, the row's normal equations are
    A^T H A L = A^T H (w - z), A = diag(s) onehot(c): (C, C) per row. Entries no code uses keep
    their value (the solve is for the change, with a small ridge).

    H is dampened as GPTQ's (damp * mean(diag H) added to the diagonal) and the new entries are kept
    within the old LUT's range: a Hessian from a few tokens has directions it does not see, and the
    undampened solve moved LUT entries along them without bound (1 token, K = 128: weight error
    0.066 -> 6.3)."""
    from any4ao.validation import dequant_range_ok

    n, k = w.shape
    c = lut.shape[1]
    compute = torch.float64 if w.device.type == "cpu" else torch.float32
    h = hessian.to(device=w.device, dtype=compute)
    h = h + damp * torch.diagonal(h).mean() * torch.eye(k, dtype=compute, device=w.device)
    s_full = expand_groups(scales, k, group_size).to(compute)
    target = w.to(compute) - expand_groups(zeros, k, group_size).to(compute)
    new_lut = torch.empty(n, c, dtype=torch.float64, device=w.device)
    step = max(1, REFIT_CHUNK_ELEMENTS // (k * c))
    for r1 in range(0, n, step):
        rows = slice(r1, min(r1 + step, n))
        onehot = torch.zeros(rows.stop - r1, k, c, dtype=compute, device=w.device)
        onehot.scatter_(2, codes[rows].long()[..., None], s_full[rows, :, None])  # A, one row at a time
        h_a = (h @ onehot.permute(1, 0, 2).reshape(k, -1)).reshape(k, -1, c).permute(1, 0, 2)
        normal = (onehot.transpose(1, 2) @ h_a).double()  # A^T H A
        rhs = (target[rows, None, :] @ h_a).squeeze(1).double()  # (w - z) H A
        old = lut[rows].double()
        rhs -= (normal @ old[..., None]).squeeze(-1)
        ridge = 1e-9 * torch.diagonal(normal, dim1=1, dim2=2).sum(-1).clamp_min(1e-300) / c
        normal += ridge[:, None, None] * torch.eye(c, dtype=torch.float64, device=w.device)
        new_lut[rows] = old + torch.linalg.solve(normal, rhs)
    new_lut = torch.minimum(torch.maximum(new_lut, lut[:, :1].double()), lut[:, -1:].double())
    new_lut = new_lut.to(dtype).float()
    new_lut, order = new_lut.sort(dim=1)
    renumber = torch.empty_like(order).scatter_(1, order, torch.arange(c, device=w.device).expand(n, c))
    new_codes = torch.gather(renumber, 1, codes.long()).to(torch.uint8)
    before = _row_output_error(w, dequantize_codes(codes, lut, scales, zeros, group_size), h)
    after = _row_output_error(w, dequantize_codes(new_codes, new_lut, scales, zeros, group_size), h)
    better = (after < before) & torch.isfinite(new_lut).all(1)
    better &= dequant_range_ok(new_lut.to(dtype), scales.to(dtype), zeros.to(dtype), dtype).all(1)
    keep = better[:, None]
    return torch.where(keep, new_codes, codes), torch.where(keep, new_lut, lut)
