"""The one validation layer: every entry point (quantize_model / quantize_, Any4Tensor construction
and from_hp, load_quantized, from_pretrained, torch.load, the custom ops) goes through these checks.

Three kinds of checks, by cost:
  * inputs to quantization (check_weight, check_channel_weight): run once per layer before k-means;
  * structure of an Any4Tensor (check_structure): shapes, dtypes, devices, nbits, group size. Metadata
    only (no data is read), so it runs on every construction, also of views inside ops and on fake
    tensors under torch.compile;
  * values of an Any4Tensor (check_values): code range for the bit width, zero padding codes,
    finite sorted LUTs, finite non-negative scales, finite zero points, and every LUT entry times
    every group's scale plus its zero point finite in the storage dtype. Vectorised; run by the load
    paths (load_quantized, from_pretrained, torch.load / unpickling), not per op.

Plus content checksums (xxh3_64 of each stored tensor's dtype, shape and bytes; bytes alone in older
files, crc32 in files of any4ao 0.2.0),
written by save_quantized and by transformers' save_pretrained, verified on load.

A value is valid if quantization can produce it: scale 0 is valid (a constant group: it
dequantizes to its zero point), a negative or non-finite scale is not.
"""

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch

from any4ao.config import FLOAT_DTYPES, GROUP_MULTIPLE, MAX_GROUP, MIN_GROUP


class InvalidAny4TensorError(ValueError):
    """The parts of an Any4Tensor do not form a valid quantized weight (bad checkpoint or arguments)."""


class ChecksumError(ValueError):
    """A stored tensor's bytes do not match the checksum written with it."""


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, incomplete, or does not fit the model it is loaded into."""


# ----- inputs to quantization -----
def _is_data_less(t: torch.Tensor) -> bool:
    """Meta or fake tensors (torch.compile tracing): no values to check."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "meta" or is_fake(t)


def check_weight(layer: str, weight: torch.Tensor, lut_dtype: Optional[torch.dtype] = None) -> None:
    """A weight any4ao can quantize: a finite 2-D float tensor with data, whose values fit `lut_dtype`."""
    if hasattr(weight, "qdata") and hasattr(weight, "lut"):  # (an Any4Tensor; not imported here)
        raise ValueError(f"layer {layer!r}: weight is already an Any4Tensor (quantized twice?)")
    if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOAT_DTYPES:
        dtype = getattr(weight, "dtype", type(weight).__name__)
        raise ValueError(f"layer {layer!r}: weight dtype {dtype} is not supported; expected one of {FLOAT_DTYPES}")
    if weight.ndim != 2:
        raise ValueError(
            f"layer {layer!r}: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}"
        )
    if weight.numel() == 0:
        raise ValueError(f"layer {layer!r}: weight is empty, shape {tuple(weight.shape)}")
    if weight.device.type == "meta":
        raise ValueError(
            f"layer {layer!r}: weight is on the meta device (it has no values to quantize); load the real "
            "weights first, e.g. from_pretrained without a meta device map, or model.to_empty() + load_state_dict"
        )
    if _is_data_less(weight):
        raise ValueError(f"layer {layer!r}: cannot quantize a fake tensor (quantize outside torch.compile tracing)")
    weight = weight.detach()  # a parameter made under inference_mode requires grad but cannot record it
    bad = ~torch.isfinite(weight)
    if bool(bad.any()):
        nan = int(torch.isnan(weight).sum())
        raise ValueError(
            f"layer {layer!r}: weight has {nan} NaN and {int(bad.sum()) - nan} Inf values; "
            f"refusing to quantize (first at index {tuple(bad.nonzero()[0].tolist())})"
        )
    dtype = lut_dtype or weight.dtype
    if dtype != weight.dtype and dtype.itemsize < 4:
        amax = float(weight.abs().max())
        if amax > torch.finfo(dtype).max:
            raise ValueError(
                f"layer {layer!r}: weights up to {amax:.4g} do not fit lut_dtype {dtype} "
                f"(largest finite {torch.finfo(dtype).max:.4g}); use a wider lut_dtype"
            )


def _check_real_tensor(layer: str, what: str, t) -> None:
    """A real-valued tensor with data (not complex, bool, meta or fake); from_hp moves it to the
    weight's device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"layer {layer!r}: {what} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"layer {layer!r}: {what} must be real-valued, got {t.dtype}")
    if _is_data_less(t):
        raise ValueError(f"layer {layer!r}: {what} has no values (a meta or fake tensor)")


def check_hessian(layer: str, hessian, weight: torch.Tensor) -> None:
    """GPTQ's layer-input Hessian E[x x^T]: real, (K, K), finite, with a non-negative diagonal (a
    second moment's; zero marks an unused input)."""
    _check_real_tensor(layer, "hessian", hessian)
    k = weight.shape[1]
    if hessian.shape != (k, k):
        raise ValueError(f"layer {layer!r}: hessian has shape {tuple(hessian.shape)}, expected ({k}, {k})")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError(f"layer {layer!r}: hessian has NaN or Inf entries")
    negative = torch.diagonal(hessian) < 0
    if bool(negative.any()):
        raise ValueError(
            f"layer {layer!r}: hessian has negative diagonal entries, which no E[x x^T] has (first at "
            f"{int(negative.nonzero()[0])})"
        )
    asymmetry = max(  # in row blocks: a K x K temporary is 0.8 GB at Llama-3-8B's K = 14336
        float((hessian[i : i + 1024] - hessian[:, i : i + 1024].T).abs().max()) for i in range(0, k, 1024)
    )
    if asymmetry > 1e-4 * max(abs(float(hessian.max())), abs(float(hessian.min()))):
        raise ValueError(
            f"layer {layer!r}: hessian is not symmetric (largest |H - H^T| is {asymmetry:.3g}), which no "
            "E[x x^T] is: pass the layer inputs' second moment X^T X / tokens"
        )


def check_channel_weight(layer: str, channel_weight: torch.Tensor, weight: torch.Tensor) -> None:
    """Calibration statistics must fit the layer they are applied to and carry information."""
    _check_real_tensor(layer, "calibration statistics (channel_weight)", channel_weight)
    if channel_weight.shape != (weight.shape[1],):
        raise ValueError(
            f"layer {layer!r}: calibration statistics have shape {tuple(channel_weight.shape)}, "
            f"expected ({weight.shape[1]},) for in_features={weight.shape[1]}"
        )
    if not bool(torch.isfinite(channel_weight).all()) or bool((channel_weight < 0).any()):
        raise ValueError(f"layer {layer!r}: calibration statistics contain negative, NaN or Inf values")
    if not bool((channel_weight > 0).any()):
        raise ValueError(
            f"layer {layer!r}: calibration statistics are all zero (the layer saw only zero inputs, or they "
            "underflowed): they cannot weight k-means; calibrate on other text or quantize without calibration"
        )


# ----- structure of an Any4Tensor (metadata only: safe on fake / meta tensors) -----
def _fail(what: str, name: Optional[str]):
    where = f"Any4Tensor {name!r}" if name else "Any4Tensor"
    raise InvalidAny4TensorError(f"invalid {where} (corrupt or mismatched checkpoint?): {what}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_structure(qdata, lut, scale, zero_point, nbits, block_size, shape, transposed, name=None) -> None:
    """Shapes, dtypes, devices, nbits and group size of an Any4Tensor's parts agree. Reads no data.
    (Runs on every construction, views inside ops included: plain Python, no imports.)"""
    for part, t in (("qdata", qdata), ("lut", lut), ("scale", scale), ("zero_point", zero_point)):
        if not isinstance(t, torch.Tensor):
            _fail(f"{part} is a {type(t).__name__}, not a tensor", name)
    if not _is_int(nbits) or nbits not in (2, 3, 4):
        _fail(f"nbits={nbits!r}, expected the int 2, 3 or 4", name)
    if not isinstance(transposed, bool):
        _fail(f"transposed={transposed!r}, expected a bool", name)
    if not isinstance(block_size, (list, tuple)) or len(block_size) != 2 or not all(map(_is_int, block_size)):
        _fail(f"block_size={block_size!r}, expected [1, group_size]", name)
    group = block_size[1]
    if block_size[0] != 1 or group % GROUP_MULTIPLE or not MIN_GROUP <= group <= MAX_GROUP:
        _fail(
            f"block_size={list(block_size)}, expected [1, group_size] with group_size a multiple of "
            f"{GROUP_MULTIPLE} in [{MIN_GROUP}, {MAX_GROUP}]",
            name,
        )
    if qdata.dtype != torch.uint8 or qdata.ndim != 2:
        _fail(f"qdata must be 2-D uint8, got {qdata.dtype} {tuple(qdata.shape)}", name)
    if any(not _is_int(s) and not isinstance(s, torch.SymInt) or s < 0 for s in shape):
        _fail(f"shape={tuple(shape)} is not a tuple of non-negative ints", name)
    if len(shape) == 1 and not transposed and qdata.shape[0] > 0:
        # the flat alias `view(-1)` makes for FSDP2's bookkeeping; no op computes with it
        n, k = qdata.shape[0], shape[0] // qdata.shape[0]
        if n * k != shape[0]:
            _fail(f"flat shape {tuple(shape)} is not a whole number of {n} rows", name)
    elif len(shape) != 2:
        _fail(f"shape={tuple(shape)} is not 2-D", name)
    else:
        n, k = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
    if k == 0 and n > 0:
        _fail(f"shape={tuple(shape)} has no input features", name)
    groups = -(-k // group)
    expected = {
        "qdata": (n, -(-k // (4 if nbits == 2 else 2))),  # any4ao.tensor.packing.packed_width
        "lut": (n, 2**nbits),
        "scale": (n, groups),
        "zero_point": (n, groups),
    }
    for part, t in (("qdata", qdata), ("lut", lut), ("scale", scale), ("zero_point", zero_point)):
        if tuple(t.shape) != expected[part]:
            _fail(
                f"{part} has shape {tuple(t.shape)}, expected {expected[part]} for a {n}x{k} weight, "
                f"nbits={nbits}, group_size={group}",
                name,
            )
    if not (lut.dtype == scale.dtype == zero_point.dtype) or not lut.is_floating_point():
        _fail(
            f"lut, scale, zero_point dtypes {lut.dtype}, {scale.dtype}, {zero_point.dtype} must be one float dtype",
            name,
        )
    if lut.dtype not in FLOAT_DTYPES + (torch.float64,):
        _fail(f"dtype {lut.dtype} is not supported for lut, scale and zero_point", name)
    devices = {t.device for t in (qdata, lut, scale, zero_point)}
    if len(devices) != 1:
        _fail(f"parts live on different devices {sorted(map(str, devices))}", name)
    if n > 1 and scale.stride(0) != zero_point.stride(0):
        _fail(
            f"scale and zero_point have row strides {scale.stride(0)} and {zero_point.stride(0)}: the kernels "
            "read both with one stride (pass them contiguous)",
            name,
        )


# ----- values of an Any4Tensor (load paths) -----
def dequant_range_ok(lut, scale, zero_point, dtype: torch.dtype) -> torch.Tensor:
    """(N, G) bool: every LUT entry of the row times the group's scale plus its zero point stays
    finite in `dtype`, and so does the float32 product the kernels form first. For 16-bit dtypes
    computed in float32 as the kernels do (the products are exact there, and rounding is monotonic,
    so a result at most the dtype's max is exactly what the kernel gets), else in float64. The LUT
    must be sorted per row, so its first and last entries are the extremes. NaN gives False."""
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64
    lo, hi = lut[:, :1].to(compute), lut[:, -1:].to(compute)
    s, z = scale.to(compute), zero_point.to(compute)
    limit = torch.finfo(dtype).max
    p_lo, p_hi = lo * s, hi * s
    ok = torch.maximum((p_lo + z).abs(), (p_hi + z).abs()) <= limit
    if dtype != torch.float64:  # the kernels' float32 product must not overflow either
        ok &= torch.maximum(p_lo.abs(), p_hi.abs()) <= max(limit, torch.finfo(torch.float32).max)
    return ok


def _padding_mask(nbits: int, in_features: int) -> int:
    """Bits of the last byte of a row that hold padding codes (pack_codes writes code 0 there)."""
    from any4ao.tensor.packing import codes_per_byte

    per = codes_per_byte(nbits)
    used = in_features % per
    if used == 0:
        return 0
    bits = 8 // per
    return (0xFF << (used * bits)) & 0xFF


def _first(mask: torch.Tensor):
    return tuple(mask.nonzero()[0].tolist())


def _min_step(lut: torch.Tensor) -> torch.Tensor:
    """The smallest difference between neighbouring entries of a LUT row: >= 0 iff every row is
    sorted ascending (NaN where a NaN is involved, which fails >= 0). In float32 (float64 for
    float64 LUTs: distinct values must stay distinct), where the strided 16-bit comparison it
    replaces cost twice as long (0.54 against 0.26 ms for 49k rows on this CPU)."""
    wide = lut if lut.dtype == torch.float64 else lut.float()
    return torch.diff(wide, dim=1).amin()


def _value_summary(lut: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> Tuple[bool, bool]:
    """(LUT rows sorted and scales >= 0, |lut * scale + zero_point| within the dtype's range by a bound
    from the extremes), from a few reductions read back in one sync. NaN anywhere fails both (it
    propagates through min / max and fails every comparison); a loose bound is not a failure:
    dequant_range_ok then decides per group."""
    dtype = lut.dtype  # one dtype for the three parts (check_structure)
    stats = torch.stack(
        [_min_step(lut).to(dtype), *torch.aminmax(scale), *torch.aminmax(zero_point)] + list(torch.aminmax(lut))
    ).tolist()
    min_step, s_min, s_max, z_min, z_max, l_min, l_max = stats
    limit = torch.finfo(dtype).max
    product_limit = max(limit, torch.finfo(torch.float32).max) if dtype != torch.float64 else float("inf")
    product = max(abs(l_min), abs(l_max)) * s_max  # float64 (Python) arithmetic: no overflow
    bounded = product <= product_limit and product + max(abs(z_min), abs(z_max)) <= limit
    return min_step >= 0 and s_min >= 0, bounded


def check_values(t, name: Optional[str] = None) -> None:
    """Value checks of an Any4Tensor `t` (see the module docstring); InvalidAny4TensorError naming
    the tensor, the problem and the first bad position. No-op on meta / fake tensors. A few
    reductions on the good path (NaN and Inf fail them too); `_explain_values` names the problem."""
    if _is_data_less(t.qdata):
        return
    qdata, lut, scale, zero_point = t.qdata, t.lut, t.scale, t.zero_point
    if qdata.shape[0] == 0:
        return
    _check_codes(t, name)  # 3-bit: bit 3 of each nibble clear (codes 0..7); padding codes zero
    # the good path: a few reductions in one sync; only if their bound is too loose, the exact per-group check
    good, bounded = _value_summary(lut, scale, zero_point)
    if good and not bounded:
        good = bool(dequant_range_ok(lut, scale, zero_point, t.dtype).all())
    if not good:
        _explain_values(t, name)
        _fail("values out of range", name)  # (_explain_values raises first)


def _check_codes(t, name) -> None:
    """The code checks of check_values: 3-bit codes below 8, padding codes zero."""
    qdata, k = t.qdata, t.in_features
    if t.nbits == 3:
        bad = _any_bits(qdata, 0x88)
        if bad is not None:
            _fail(f"3-bit codes above 7 in row {bad[0]} (byte {bad[1]}): the codes are corrupt", name)
    pad = _padding_mask(t.nbits, k)
    if pad:
        bad = (qdata[:, -1] & pad) != 0
        if bool(bad.any()):
            _fail(f"padding codes beyond in_features={k} are not zero in row {_first(bad)[0]}", name)


def check_all_values(tensors: Mapping[str, "torch.Tensor"], where: str = "") -> None:
    """check_values for many Any4Tensors (a checkpoint's), with the LUT / scale / zero point checks
    batched: one concatenation per dtype and LUT width, then the same few reductions as
    check_values, so the cost does not grow with the number of tensors. If the batch fails, or its
    range bound is too loose, each tensor is checked on its own, which names the bad one."""
    groups: Dict[tuple, list] = {}

    def named(check, t, name):
        try:
            check(t, None)
        except InvalidAny4TensorError as e:
            raise InvalidAny4TensorError(f"{where}: tensor {name!r}: {e}" if where else f"{name!r}: {e}") from None

    for name, t in tensors.items():
        if _is_data_less(t.qdata) or t.qdata.shape[0] == 0:
            continue
        named(_check_codes, t, name)
        groups.setdefault((t.dtype, t.lut.shape[1], t.lut.device), []).append((name, t))
    for members in groups.values():
        lut = torch.cat([t.lut for _, t in members])
        scale = torch.cat([t.scale.reshape(-1) for _, t in members])
        zero = torch.cat([t.zero_point.reshape(-1) for _, t in members])
        if not all(_value_summary(lut, scale, zero)):
            for name, t in members:
                named(check_values, t, name)


def _explain_values(t, name) -> None:
    lut, scale, zero_point = t.lut, t.scale, t.zero_point
    for part, v in (("lut", lut), ("scale", scale), ("zero_point", zero_point)):
        bad = ~torch.isfinite(v)
        if bool(bad.any()):
            _fail(f"{part} has {int(bad.sum())} NaN/Inf values (first at {_first(bad)})", name)
    unsorted = lut[:, 1:] < lut[:, :-1]
    if bool(unsorted.any()):
        _fail(f"lut row {_first(unsorted)[0]} is not sorted ascending", name)
    negative = scale < 0
    if bool(negative.any()):
        _fail(f"scale has {int(negative.sum())} negative values (first at {_first(negative)})", name)
    bad = ~dequant_range_ok(lut, scale, zero_point, t.dtype)
    if bool(bad.any()):
        _fail(
            f"{int(bad.sum())} groups dequantize to values beyond {t.dtype}'s range "
            f"(first at {_first(bad)}): lut * scale + zero_point would be Inf",
            name,
        )


def _any_bits(qdata: torch.Tensor, mask: int, chunk_rows: int = 4096):
    """(row, byte) of the first byte of `qdata` with any of `mask`'s bits set, or None. Wide
    integer views where the rows allow it (one pass over the bytes, 8 per element), in row chunks
    (bounded temporaries)."""
    width = qdata.shape[1]
    word = next((w for w, dt in ((8, torch.int64), (4, torch.int32), (2, torch.int16)) if width % w == 0), 1)
    for start in range(0, qdata.shape[0], chunk_rows):
        rows = qdata[start : start + chunk_rows]
        if word > 1 and rows.is_contiguous():
            dt = {8: torch.int64, 4: torch.int32, 2: torch.int16}[word]
            m = int.from_bytes(bytes([mask]) * word, "little", signed=True)
            hit = (rows.view(dt) & m) != 0
        else:
            hit = (rows & mask) != 0
        if bool(hit.any()):
            r, c = _first(hit)
            if word > 1 and rows.is_contiguous():
                byte = next(i for i in range(word) if int(rows[r, c * word + i]) & mask)
                c = c * word + byte
            return start + r, c
    return None


# ----- content checksums -----
CHECKSUM_KEY = "any4ao_checksums"
ALGORITHM_KEY = "any4ao_checksum_algorithm"
# xxh3 (64-bit) rather than zlib's crc32: crc32 hashed at about the speed the file is read, so
# verifying doubled the load time (benchmarks/bench_load.py). "+layout": a tensor's hash starts with
# its dtype and shape, so an edited header (BF16 -> F16 has the same bytes) fails too. Files written
# by any4ao 0.2.0 (no algorithm entry, or "crc32") and before the layout (plain "xxh3_64") are
# verified with what they name.
CHECKSUM_ALGORITHM = "xxh3_64+layout"
_CHUNK = 1 << 22  # large tensors are hashed in 4 MiB pieces, in order


class _Crc32:
    def __init__(self):
        self.crc = 0

    def update(self, data) -> None:
        self.crc = zlib.crc32(data, self.crc)

    def hexdigest(self) -> str:
        return f"{self.crc:08x}"


def new_hasher(algorithm: str = CHECKSUM_ALGORITHM):
    """An object with update(bytes-like) and hexdigest() for a checksum algorithm of the format
    (what it hashes first for a tensor: tensor_hasher)."""
    base, _, extra = algorithm.partition("+")
    if extra not in ("", "layout"):
        base = algorithm  # unknown
    if base == "xxh3_64":
        import xxhash

        return xxhash.xxh3_64()
    if base == "crc32":
        return _Crc32()
    raise ChecksumError(
        f"unknown checksum algorithm {algorithm!r} (this any4ao knows xxh3_64+layout, xxh3_64 and crc32)"
    )


def tensor_hasher(algorithm: str, dtype: torch.dtype, shape):
    """The hasher of one tensor's bytes: for "+layout" algorithms it has already taken the dtype
    and shape, as they stand in the file's header."""
    hasher = new_hasher(algorithm)
    if algorithm.endswith("+layout"):
        hasher.update(f"{str(dtype).removeprefix('torch.')}{[int(d) for d in shape]};".encode())
    return hasher


def checksum_algorithm(metadata: Mapping[str, str]) -> str:
    """The algorithm a file's checksums were taken with (crc32 for files from any4ao 0.2.0)."""
    algorithm = metadata.get(ALGORITHM_KEY, "crc32")
    new_hasher(algorithm)  # ChecksumError if unknown
    return algorithm


def _bytes_of(t: torch.Tensor):
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def tensor_checksum(t: torch.Tensor, algorithm: str = CHECKSUM_ALGORITHM) -> str:
    """Checksum of the tensor's raw (row-major, little-endian) bytes (after its dtype and shape for
    "+layout" algorithms), as hex digits."""
    data = _bytes_of(t)
    hasher = tensor_hasher(algorithm, t.dtype, t.shape)
    for start in range(0, len(data), _CHUNK):
        hasher.update(data[start : start + _CHUNK])
    return hasher.hexdigest()


def text_checksum(text: str, algorithm: str = CHECKSUM_ALGORITHM) -> str:
    hasher = new_hasher(algorithm)
    hasher.update(text.encode())
    return hasher.hexdigest()


def _workers() -> int:
    return max(1, min(8, (os.cpu_count() or 1)))


def checksums(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] = (), keys=None, algorithm=CHECKSUM_ALGORITHM
) -> Dict[str, str]:
    """{key: checksum} for every tensor, and {'meta:' + key: checksum} for the metadata entries in
    `keys` (the JSON describing each Any4Tensor: nbits, group size, shape, transposed). Both hash
    libraries release the GIL, so large tensors are hashed in parallel threads."""
    items = list(tensors.items())
    with ThreadPoolExecutor(_workers()) as pool:
        sums = dict(zip([k for k, _ in items], pool.map(lambda kv: tensor_checksum(kv[1], algorithm), items)))
    for key in keys or ():
        sums[f"meta:{key}"] = text_checksum(metadata[key], algorithm)
    return sums


def verify_checksums(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    where: str,
    expected: Optional[Mapping[str, str]] = None,
    only: Optional[Iterable[str]] = None,
    meta_keys: Optional[Iterable[str]] = None,
    computed: Optional[Mapping[str, str]] = None,
    skip_hint: str = "pass verify_checksums=False to load it anyway",
) -> None:
    """ChecksumError naming `where` (the file) and the first tensor or metadata entry whose bytes
    differ from the stored checksum. `only`: check just these tensor keys; `meta_keys`: just these
    metadata entries (default: every one the checksums cover); `computed`: checksums of `tensors`
    already taken (load_quantized hashes each tensor as it reads it); `skip_hint`: how the caller's
    users turn verification off. The algorithm is the one the metadata names."""
    algorithm = checksum_algorithm(metadata)
    if expected is None:
        expected = json.loads(metadata[CHECKSUM_KEY])
    keys = list(tensors) if only is None else list(only)
    missing = [k for k in keys if k not in expected]
    if missing:
        raise ChecksumError(f"{where}: no checksum stored for {missing[:5]} (file edited?)")
    got = computed if computed is not None else checksums({k: tensors[k] for k in keys}, algorithm=algorithm)
    for k in keys:
        if got[k] != expected[k]:
            raise ChecksumError(
                f"{where}: tensor {k!r} is corrupt: its {algorithm} is {got[k]}, the file's checksum says {expected[k]} "
                f"(truncated, edited or damaged file; {skip_hint})"
            )
    if meta_keys is None:
        meta_keys = [key[len("meta:") :] for key in expected if key.startswith("meta:")]
    for entry in meta_keys:
        want = expected.get(f"meta:{entry}")
        if want is None or entry not in metadata or text_checksum(metadata[entry], algorithm) != want:
            raise ChecksumError(
                f"{where}: the metadata of {entry!r} (nbits, group size, shape, orientation) was edited: "
                "its checksum does not match"
            )
