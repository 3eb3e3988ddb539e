import torch
from hypothesis import given
from hypothesis import strategies as st

from any4ao.tensor.packing import pack_codes, packed_width, unpack_codes


@given(n=st.integers(1, 9), k=st.integers(1, 70), nbits=st.sampled_from([2, 3, 4]), seed=st.integers(0, 2**16))
def test_pack_unpack_is_identity(n, k, nbits, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**nbits, (n, k), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, nbits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (n, packed_width(k, nbits))
    assert torch.equal(unpack_codes(packed, nbits, k), codes)


def test_layout_is_low_nibble_first():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert pack_codes(codes, 4).tolist() == [[0x21, 0x0F]]
    codes2 = torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)
    assert pack_codes(codes2, 2).tolist() == [[1 | 2 << 2 | 3 << 4]]
