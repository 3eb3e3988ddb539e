"""Bit packing of codes along K into uint8.

4-bit: two codes per byte, the even column in the low nibble.
2-bit: four codes per byte, column 4j+i in bits 2i..2i+1.
3-bit: stored in nibbles like 4-bit (3 of every 4 bits used, 4 bits/weight on disk). A dense
       3-bit layout straddles bytes and would cost the kernels extra shifts; nibbles keep one
       kernel for 3 and 4 bits. The LUT still has 8 entries.
A row whose K is not a multiple of the codes per byte is padded with code 0 to a whole byte.
"""

import torch


def codes_per_byte(nbits: int) -> int:
    if nbits == 2:
        return 4
    if nbits in (3, 4):
        return 2
    raise ValueError(f"nbits must be 2, 3 or 4, got {nbits}")


def packed_width(in_features: int, nbits: int) -> int:
    per = codes_per_byte(nbits)
    return -(-in_features // per)


def pack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """(N, K) integer codes in [0, 2**nbits) -> (N, ceil(K / per_byte)) uint8."""
    per = codes_per_byte(nbits)
    bits = 8 // per
    n, k = codes.shape
    pad = packed_width(k, nbits) * per - k
    c = codes.to(torch.uint8)
    if pad:
        c = torch.cat([c, c.new_zeros(n, pad)], dim=1)
    c = c.reshape(n, -1, per)
    out = c[..., 0].clone()
    for i in range(1, per):
        out |= c[..., i] << (bits * i)
    return out


def unpack_codes(packed: torch.Tensor, nbits: int, in_features: int) -> torch.Tensor:
    """Inverse of pack_codes: (N, ceil(K / per_byte)) uint8 -> (N, K) uint8 codes."""
    per = codes_per_byte(nbits)
    bits = 8 // per
    mask = (1 << bits) - 1
    shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
    codes = (packed[..., None] >> shifts) & mask
    return codes.reshape(packed.shape[0], packed.shape[1] * per)[:, :in_features]  # (no -1: N may be 0)
