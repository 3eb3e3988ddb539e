"""FSDP2 (`fully_shard`) support: shard Any4Tensor by rows, all-gather the packed form.

A row of W owns its codes, its LUT and its group scales/zeros, so a row shard is an Any4Tensor of
its own and FSDP2's Shard(0) needs no dequantize. What FSDP2 does with a parameter, and the op
that serves it here:
  torch.chunk(W, world)                    -> aten.split       row blocks
  W.new_zeros(padded rows) + narrow/copy_  -> new_zeros, slice, copy_ (TorchAOBaseTensor)
  padded.view(-1)                          -> view             a flat alias FSDP keeps for bookkeeping
  fsdp_pre_all_gather                      -> the four packed parts, padded to the padded row count
  fsdp_post_all_gather + as_strided        -> rebuild (world * padded rows) and drop the padding rows
So an all-gather moves ~4.3 bits per weight (codes + LUT + scales + zeros), never bf16.

Uneven row counts: FSDP2 pads every shard to ceil(N / world) rows by allocating that many rows
(`new_zeros`) and narrowing to the real ones, so the padded row count is the row capacity of the
shard's storage; each rank reads it from there and all ranks agree without a collective.
"""

from typing import Optional, Tuple

import torch

PARTS = ("qdata", "lut", "scale", "zero_point")


def _storage_rows(t: torch.Tensor) -> int:
    """Rows that fit in t's storage from its offset on (t is row-major, rows of t.shape[1])."""
    elements = t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()
    return elements // t.shape[1] if t.shape[1] else t.shape[0]


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    padded = t.new_zeros(rows, t.shape[1])
    padded[: t.shape[0]].copy_(t)
    return padded


def pre_all_gather(w, mesh) -> Tuple[Tuple[torch.Tensor, ...], tuple]:
    if w.transposed or w.ndim != 2:
        raise NotImplementedError("FSDP2 shards Any4Tensor weights in their stored (out, in) orientation only")
    parts = [getattr(w, name) for name in PARTS]
    padded = min(_storage_rows(t) for t in parts)
    if padded < w.shape[0]:
        raise RuntimeError(f"Any4Tensor shard of {w.shape[0]} rows has storage for only {padded}")
    inputs = tuple(_pad_rows(t.contiguous(), padded) for t in parts)
    return inputs, (w.nbits, list(w.block_size), w.shape[1], w.dtype, w.kernel_preference)


def post_all_gather(w, outputs, metadata, param_dtype: Optional[torch.dtype], *, out=None):
    nbits, block_size, in_features, dtype, kernel_preference = metadata
    qdata, lut, scale, zero_point = outputs
    dtype = param_dtype or dtype  # FSDP mixed precision: the small float parts follow param_dtype
    floats = [t if t.dtype == dtype else t.to(dtype) for t in (lut, scale, zero_point)]
    if out is not None:  # later all-gathers land in the same buffers; re-cast only where we cast
        for mine, got in zip((out.lut, out.scale, out.zero_point), floats):
            if mine.untyped_storage().data_ptr() != got.untyped_storage().data_ptr():
                mine.copy_(got[: mine.shape[0]])  # `out` holds the real rows only (as_strided)
        return None
    # type(w), not an import of Any4Tensor: any4_tensor imports this module
    full = type(w)(
        qdata,
        *floats,
        nbits,
        block_size,
        torch.Size([qdata.shape[0], in_features]),
        kernel_preference=kernel_preference,
    )
    return full, (qdata, *floats)
