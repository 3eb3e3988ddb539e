"""Save and load any4-quantized weights as safetensors, without re-running k-means.

`save_quantized(model, "model.safetensors")` flattens every Any4Tensor into plain tensors
(`<module>._weight_qdata`, `_weight_lut`, `_weight_scale`, `_weight_zero_point`) plus JSON
metadata, the layout torchao and transformers use for their own tensor subclasses (so a file
written by transformers' `save_pretrained` reads the same way), and a checksum (xxh3_64) of every
tensor and of every Any4Tensor's metadata entry. Tied weights (one tensor under two names, e.g. SmolLM2's
embedding and LM head) are stored once and recorded as aliases. The file is written to a temporary
name and renamed, so an existing checkpoint is replaced whole or not at all.

`load_quantized(path)` rebuilds the state dict; `load_quantized(path, model)` installs it into a
model of the same architecture. Before anything in the model changes: the checksums are verified
(`verify_checksums=False` skips that), every Any4Tensor's structure and values are checked
(any4ao.validation), and every key, shape and slot of the model is matched. Errors name the file
and the tensor: a bad file never loads as a silently wrong model.
"""

import dataclasses
import heapq
import json
import os
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from torch import nn

from any4ao.codebooks.fixed import fixed_codebook_of
from any4ao.config import Any4WeightOnlyConfig
from any4ao.tensor.any4_tensor import Any4Tensor
from any4ao.validation import (
    ALGORITHM_KEY,
    CHECKSUM_ALGORITHM,
    CHECKSUM_KEY,
    CheckpointError,
    ChecksumError,
    InvalidAny4TensorError,
    check_all_values,
    checksum_algorithm,
    checksums,
    tensor_hasher,
    verify_checksums,
)

# 3: checksums are xxh3_64, over each tensor's dtype and shape too since "xxh3_64+layout" (the metadata
# names the algorithm); 2 (any4ao 0.2.0): crc32. All are read.
FORMAT_KEY, FORMAT_VERSION = "any4ao_format", "3"
READABLE_FORMATS = ("2", "3")
ALIASES_KEY = "any4ao_aliases"
ANY4_PARTS = list(Any4Tensor.tensor_data_names)
ANY4_ATTRIBUTES = {"nbits", "block_size", "shape", "transposed", "kernel_preference"}


def _prefix(name: str) -> str:
    """'<module>._<param>_' (torchao's naming of a subclass's parts), '_<param>_' at top level."""
    module, _, param = name.rpartition(".")
    return f"{module}._{param}_" if module else f"_{param}_"


def _storage_key(t: torch.Tensor):
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _flatten(state: Dict[str, torch.Tensor], path):
    """(tensors, metadata, aliases): torchao's flattened layout, with tensors that are one object (or
    one view of one storage) under several names stored once, and other storage sharing cloned."""
    from torchao.prototype.safetensors.safetensors_utils import TensorSubclassAttributeJSONEncoder

    reserved = {"__metadata__", "format", "tensor_names", "any4ao_config", FORMAT_KEY, ALIASES_KEY}
    reserved |= {CHECKSUM_KEY, ALGORITHM_KEY}
    part_keys = {_prefix(n) + p: n for n, v in state.items() if isinstance(v, Any4Tensor) for p in ANY4_PARTS}
    for name in state:
        if name in reserved:
            raise CheckpointError(f"{path}: a tensor named {name!r} would overwrite the file's metadata entry")
        if name in part_keys:
            raise CheckpointError(
                f"{path}: a tensor named {name!r} would overwrite a stored part of the quantized {part_keys[name]!r}"
            )
    tensors, metadata, aliases, seen, storages = {}, {}, {}, {}, set()
    for name, value in state.items():
        if isinstance(value, Any4Tensor):
            key = ("any4", id(value))
        elif type(value) is torch.Tensor:
            if value.device.type == "meta":
                raise CheckpointError(f"{path}: {name!r} is on the meta device (no data to save)")
            key = _storage_key(value)
        else:
            raise CheckpointError(
                f"{path}: {name!r} is a {type(value).__name__}; save_quantized stores plain tensors and Any4Tensor only"
                + (
                    " (a model sharded by fully_shard: save it before sharding; gathering sharded Any4Tensor "
                    "weights is not supported)"
                    if type(value).__name__ == "DTensor"
                    else ""
                )
            )
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        if isinstance(value, Any4Tensor):
            if value.qdata.device.type == "meta":
                raise CheckpointError(f"{path}: {name!r} is on the meta device (no data to save)")
            if value.ndim != 2:
                raise CheckpointError(f"{path}: {name!r} is a flat (FSDP bookkeeping) alias, not a weight")
            metadata[name] = json.dumps(value, cls=TensorSubclassAttributeJSONEncoder)
            for part in ANY4_PARTS:
                tensors[_prefix(name) + part] = getattr(value, part).detach().contiguous().clone()
        else:
            storage = value.untyped_storage().data_ptr()
            value = value.detach()
            if storage in storages or not value.is_contiguous():
                value = value.contiguous().clone()  # safetensors refuses tensors that share memory
            storages.add(storage)
            metadata[name] = json.dumps({"_type": torch.Tensor.__name__})
            tensors[name] = value
    metadata["tensor_names"] = json.dumps([n for n in state if n not in aliases])
    return tensors, metadata, aliases


def _check_config_describes(config: Any4WeightOnlyConfig, state, path: Path) -> None:
    """The config stored beside the tensors must be theirs: bit width and group size (a file that
    said int4 at group 128 over any4 weights at group 32 loaded, mislabelled)."""
    for name, value in state.items():
        if not isinstance(value, Any4Tensor):
            continue
        if (value.nbits, value.group_size) != (config.bits, config.group_size):
            raise CheckpointError(
                f"{path}: the config says {config.codebook.value} at group {config.group_size}, but {name!r} is "
                f"{value.nbits}-bit at group {value.group_size}; pass the config it was quantized with (or none)"
            )
        if not config.codebook.learned and fixed_codebook_of(value.lut, value.nbits) != config.codebook.value:
            raise CheckpointError(
                f"{path}: the config says {config.codebook.value}, but the LUT of {name!r} is not that grid; "
                "pass the config it was quantized with (or none)"
            )


def save_quantized(model_or_state_dict: Union[nn.Module, Dict[str, torch.Tensor]], path, config=None) -> None:
    """Write a state dict holding Any4Tensor (and plain) tensors to a .safetensors file, atomically.
    `config` (optional, an Any4WeightOnlyConfig) is stored in the metadata for reference."""
    from safetensors.torch import save_file
    from torchao.core.config import config_to_dict

    path = Path(path)
    if config is not None and not isinstance(config, Any4WeightOnlyConfig):
        raise TypeError(f"save_quantized: config must be an Any4WeightOnlyConfig, got {type(config).__name__}")
    if not path.parent.is_dir():
        raise CheckpointError(f"{path}: the directory {path.parent} does not exist")
    if isinstance(model_or_state_dict, nn.Module):
        state = _uncompiled(model_or_state_dict).state_dict(keep_vars=True)
    else:
        state = dict(model_or_state_dict)
    state = {k: (v.detach() if type(v) is nn.Parameter else v) for k, v in state.items()}
    if not state:
        raise CheckpointError(f"{path}: nothing to save (empty state dict)")
    tensors, metadata, aliases = _flatten(state, path)
    unreadable = {k: t.dtype for k, t in tensors.items() if t.dtype not in _DTYPES.values()}
    if unreadable:  # refused before anything is written: the file would not load back
        name, dtype = next(iter(unreadable.items()))
        raise CheckpointError(
            f"{path}: tensor {name!r} is {dtype}, which a .safetensors checkpoint cannot hold as load_quantized "
            f"reads it ({len(unreadable)} such tensors); convert it (e.g. .to(torch.float32)) or leave it out"
        )
    any4_names = [n for n, v in state.items() if isinstance(v, Any4Tensor) and n not in aliases]
    metadata = {**metadata, "format": "pt", FORMAT_KEY: FORMAT_VERSION, ALIASES_KEY: json.dumps(aliases)}
    if config is not None:  # calibration statistics belong to the run, not the file
        _check_config_describes(config, state, path)
        metadata["any4ao_config"] = json.dumps(config_to_dict(dataclasses.replace(config, calibration=None)))
    metadata[ALGORITHM_KEY] = CHECKSUM_ALGORITHM
    metadata[CHECKSUM_KEY] = json.dumps(checksums(tensors, metadata, any4_names + [ALIASES_KEY, "tensor_names"]))
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; save_quantized writes one .safetensors file")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
}
# every other dtype safetensors writes, where this torch has it (a model may carry float8 buffers)
_DTYPES.update(
    {
        name: getattr(torch, attr)
        for name, attr in (
            ("F8_E4M3", "float8_e4m3fn"),
            ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
            ("F8_E5M2", "float8_e5m2"),
            ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
            ("F8_E8M0", "float8_e8m0fnu"),
            ("U64", "uint64"),
            ("U32", "uint32"),
            ("U16", "uint16"),
        )
        if hasattr(torch, attr)
    }
)


# 256 KiB: a piece the read just copied is still in the core's L1/L2 when it is hashed. With 4 MiB
# pieces hashing a 55 MB checkpoint cost +48 % of the read, with 256 KiB +27 % (128 KiB: the same);
# the read itself costs the same (benchmarks/results/load-validation-NOTE.md)
_READ_CHUNK = 1 << 18

LOAD_THREADS_ENV = "ANY4AO_LOAD_THREADS"
# the most threads a load uses, whatever $ANY4AO_LOAD_THREADS says: 10**9 started a thread, each
# with its own file handle, per tensor, and ran out of handles (EMFILE) where one thread loads
MAX_LOAD_THREADS = 64


def _read_workers(total_bytes: int) -> int:
    """Threads that read (and hash) a file's tensors: $ANY4AO_LOAD_THREADS if set (at most
    MAX_LOAD_THREADS), else half the cores, at most 8. But 1 on fewer than 4 cores (on the 2-core CI
    machine a second hashing thread did not pay) or under 16 MiB (a few ms of reading). On a 16-core
    host, 4-8 threads read a 55 MB checkpoint from the page cache in 18-19 ms against 30 ms for one
    thread (benchmarks/results/load-validation-NOTE.md)."""
    value = os.environ.get(LOAD_THREADS_ENV)
    if value is not None:
        try:
            workers = int(value)
        except ValueError:
            workers = 0
        if workers < 1:
            raise ValueError(f"{LOAD_THREADS_ENV}={value!r}: expected an integer >= 1 (threads that read a checkpoint)")
        return min(workers, MAX_LOAD_THREADS)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cores < 4 or total_bytes < 16 << 20:
        return 1
    return min(8, cores // 2)


def _shards(entries, workers: int):
    """`entries` in `workers` lists balanced by bytes (greedy, largest first), each in file order."""
    loads = [(0, i) for i in range(workers)]
    shards = [[] for _ in range(workers)]
    for entry in sorted(entries, key=lambda e: e[0] - e[1]):  # largest first; stable, so ties keep file order
        load, i = heapq.heappop(loads)
        shards[i].append(entry)
        heapq.heappush(loads, (load + entry[1] - entry[0], i))
    return [sorted(shard) for shard in shards if shard]


def _read(path: Path, hash_tensors: bool = False):
    """(tensors, metadata) of a safetensors file, read into memory owned by the tensors.

    Not safetensors' safe_open: its CPU tensors map the file (MAP_SHARED), so bytes verified at
    load would change, or fault, if the file were rewritten in place afterwards. Here every
    tensor is read with one readinto into its own storage, and the header is checked first:
    known dtype, shape matching the byte range, ranges inside the file, in order, not overlapping.
    hash_tensors: also return {key: checksum} (the algorithm the metadata names), each tensor read
    in 256 KiB pieces and each piece hashed right after it is read, while it is still in the CPU's
    cache (hashing the finished tensors from memory cost a second pass: 1.1x the read).
    With _read_workers(...) > 1 threads, the tensors are split into that many shards balanced by
    bytes, each read and hashed by its own thread through its own handle; the result is the same."""
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; load_quantized reads one .safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")

    def bad(why):
        return CheckpointError(f"{path}: not a readable safetensors file ({why})")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, shorter than the header length field")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, 100 << 20):
            raise bad(f"header length {n} exceeds the file ({size} bytes): truncated?")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise bad("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise bad("__metadata__ is not a map of strings")
        data_size = size - 8 - n
        entries = []
        for key, info in header.items():
            if isinstance(info, dict) and isinstance(info.get("dtype"), str) and info["dtype"] not in _DTYPES:
                raise bad(f"tensor {key!r} has dtype {info['dtype']}, which this torch has no dtype for")
            try:
                dtype = _DTYPES[info["dtype"]]
                if not all(type(d) is int for d in info["shape"]):  # json: 32.9 or true are no sizes
                    raise TypeError
                shape = list(info["shape"])
                start, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise bad(f"tensor {key!r}: entry {info!r} is not a dtype, shape and data_offsets") from None
            count = 1
            for d in shape:
                count *= d
            if min(shape, default=0) < 0 or end - start != count * dtype.itemsize or not 0 <= start <= end:
                raise bad(f"tensor {key!r}: {shape} x {info['dtype']} does not fill bytes {start}..{end}")
            if end > data_size:
                raise bad(f"tensor {key!r} needs bytes up to {end} but the file holds {data_size}: truncated")
            entries.append((start, end, key, dtype, shape))
        entries.sort()
        for (_, end, key, _, _), (start, _, nxt, _, _) in zip(entries, entries[1:]):
            if start < end:
                raise bad(f"tensors {key!r} and {nxt!r} overlap")
        algorithm = checksum_algorithm(metadata) if hash_tensors else None

        def load(f, start, end, key, dtype, shape):
            # on the CPU whatever the caller's default device (thread-local: worker threads never saw
            # it, so a serial read under torch.device("cuda") failed where a threaded one loaded)
            t = torch.empty(shape, dtype=dtype, device="cpu")
            hasher = tensor_hasher(algorithm, dtype, shape) if hash_tensors else None
            if end > start:
                f.seek(8 + n + start)
                view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                for a in range(0, end - start, _READ_CHUNK):
                    piece = view[a : a + _READ_CHUNK]
                    if f.readinto(piece) != len(piece):
                        raise bad(f"tensor {key!r}: short read (file changed while loading?)")
                    if hasher is not None:
                        hasher.update(piece)
            return t, (hasher.hexdigest() if hasher is not None else None)

        workers = min(_read_workers(data_size), sum(end > start for start, end, *_ in entries))
        if workers <= 1:
            loaded = {entry[2]: load(f, *entry) for entry in entries}
        else:
            loaded = _load_threaded(path, f, _shards(entries, workers), load, bad)
        tensors = {key: loaded[key][0] for _, _, key, _, _ in entries}
        sums = {key: loaded[key][1] for _, _, key, _, _ in entries} if hash_tensors else None
    return tensors, metadata, sums


def _load_threaded(path: Path, f, shards, load, bad):
    """{key: load(...)} of every entry, a pool of one thread per shard (a thread done with its shard
    may take a later one), each shard through its own handle. readinto and the hashers release the
    GIL, so reads and hashes of different shards run on different cores."""
    stop = threading.Event()
    same = os.fstat(f.fileno())

    def run(shard):
        out = {}
        with open(path, "rb") as g:
            st = os.fstat(g.fileno())
            if (st.st_dev, st.st_ino) != (same.st_dev, same.st_ino):  # replaced since its header was read
                raise bad("the file was replaced while loading")
            for entry in shard:
                if stop.is_set():  # another shard failed: its error is the one raised
                    break
                out[entry[2]] = load(g, *entry)
        return out

    with ThreadPoolExecutor(len(shards), thread_name_prefix="any4ao-load") as pool:
        futures = [pool.submit(run, shard) for shard in shards]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
        finally:
            stop.set()  # on an error (or an interrupt while waiting) the other shards stop at their next tensor
        # result() raises the error of the first failed shard (in shard order); the pool's exit waits for the rest
        return {key: value for future in futures for key, value in future.result().items()}


def _json(metadata, key, path, default=None, shape=None):
    """A metadata entry's JSON; shape "names" (a list of strings) or "map" (strings to strings)
    is checked, so a damaged entry is a CheckpointError naming it, not a TypeError later."""
    if key not in metadata:
        if default is not None:
            return default
        raise CheckpointError(f"{path}: metadata entry {key!r} is missing (damaged file?)")
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: metadata entry {key!r} is not valid JSON ({e})") from None
    if shape == "names" and not (isinstance(value, list) and all(isinstance(n, str) for n in value)):
        raise CheckpointError(f"{path}: metadata entry {key!r} is not a list of names")
    if shape == "map" and not (
        isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    ):
        raise CheckpointError(f"{path}: metadata entry {key!r} is not a map of names to strings")
    return value


def _any4_from_parts(name: str, desc: dict, parts: Dict[str, torch.Tensor], path) -> Any4Tensor:
    where = f"{path}: tensor {name!r}"
    attrs = desc.get("_data")
    if desc.get("_tensor_data_names") != ANY4_PARTS or not isinstance(attrs, dict):
        raise InvalidAny4TensorError(f"{where}: metadata does not describe an Any4Tensor's parts {ANY4_PARTS}")
    unknown = set(attrs) - ANY4_ATTRIBUTES
    if unknown or not {"nbits", "block_size", "shape"} <= set(attrs):
        raise InvalidAny4TensorError(
            f"{where}: metadata attributes {sorted(attrs)}, expected {sorted(ANY4_ATTRIBUTES)}"
        )
    shape = attrs["shape"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise InvalidAny4TensorError(f"{where}: shape {shape!r} is not a list of ints")
    try:
        return Any4Tensor(**parts, **{**attrs, "shape": torch.Size(shape)})
    except (InvalidAny4TensorError, TypeError, ValueError) as e:
        raise InvalidAny4TensorError(f"{where}: {e}") from None


def _unflatten(tensors: Dict[str, torch.Tensor], metadata: Dict[str, str], path) -> Dict[str, torch.Tensor]:
    names = _json(metadata, "tensor_names", path, shape="names")
    left = dict(tensors)
    state = {}
    for name in names:
        desc = _json(metadata, name, path)
        kind = desc.get("_type") if isinstance(desc, dict) else None
        if kind == torch.Tensor.__name__:
            if name not in left:
                raise CheckpointError(f"{path}: tensor {name!r} is missing")
            state[name] = left.pop(name)
        elif kind == "Any4Tensor":
            keys = [_prefix(name) + p for p in ANY4_PARTS]
            missing = [k for k in keys if k not in left]
            if missing:
                raise CheckpointError(f"{path}: parts missing for {name!r}: {missing}")
            parts = {p: left.pop(k) for p, k in zip(ANY4_PARTS, keys)}
            state[name] = _any4_from_parts(name, desc, parts, path)
        else:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported type {kind!r}")
    if left:
        raise CheckpointError(f"{path}: tensors not described by the metadata: {sorted(left)[:5]}")
    # the value checks, batched over the file's Any4Tensors (InvalidAny4TensorError names the tensor)
    check_all_values({n: v for n, v in state.items() if isinstance(v, Any4Tensor)}, str(path))
    aliases = _json(metadata, ALIASES_KEY, path, default={}, shape="map")
    for alias, target in aliases.items():
        if target not in state or alias in state:
            raise CheckpointError(f"{path}: alias {alias!r} -> {target!r} does not name one stored tensor")
        state[alias] = state[target]
    return state


_COMPILED_PREFIX = "_orig_mod."  # torch.compile's wrapper puts the model under this name


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module torch.compile wrapped (its state dict keys carry no _orig_mod. prefix), else the model:
    files from a compiled and an eager model are the same and load into either."""
    from torch._dynamo.eval_frame import OptimizedModule

    return model._orig_mod if isinstance(model, OptimizedModule) else model


def load_quantized(
    path, model: Optional[nn.Module] = None, device="cpu", verify_checksums: bool = True
) -> Dict[str, torch.Tensor]:
    """Rebuild the state dict written by `save_quantized` (on `device`). With `model`, also install
    it, all or nothing: each quantized weight replaces the module's parameter in place (no module
    swap, on that parameter's device and in its dtype), the rest is copied by `load_state_dict`. Returns the state dict.

    verify_checksums: compare every tensor's checksum with the file's (each piece is hashed as it is
    read: 3 to 5 ms per 55 MB on a 2-core CPU, see benchmarks/bench_load.py); False skips only
    that, the structural and value checks always run. On 4 or more cores the file is read and
    hashed on several threads (half the cores, at most 8; $ANY4AO_LOAD_THREADS sets the count)."""
    path = Path(path)
    if not isinstance(verify_checksums, bool):  # "no" would be truthy: verify, against the caller's wish
        raise TypeError(f"load_quantized: verify_checksums must be a bool, got {verify_checksums!r}")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"load_quantized: device must be a str or torch.device, got {device!r}")
    device = torch.device(device)  # ValueError/RuntimeError for a name that is no device, before reading
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"load_quantized: model must be an nn.Module, got {type(model).__name__}")
        if not model.state_dict():
            raise CheckpointError(
                f"{path}: the {type(model).__name__} has no parameters or buffers to load into "
                "(pass a model of the architecture that was saved)"
            )
        if any(t.device.type == "meta" for t in model.state_dict(keep_vars=True).values()):
            raise CheckpointError(
                f"{path}: the model has parameters on the meta device; materialise it first "
                "(model.to_empty(device='cpu')) and then load"
            )
    tensors, metadata, sums = _read(path, hash_tensors=verify_checksums)
    version = metadata.get(FORMAT_KEY)
    if version is None:
        raise CheckpointError(f"{path}: no {FORMAT_KEY!r} metadata, so not written by any4ao.save_quantized")
    if version not in READABLE_FORMATS:
        raise CheckpointError(f"{path}: format version {version!r}; this any4ao reads versions {READABLE_FORMATS}")
    if verify_checksums:
        if CHECKSUM_KEY not in metadata:
            raise ChecksumError(f"{path}: no checksums in the metadata (edited file?); verify_checksums=False loads it")
        expected = _json(metadata, CHECKSUM_KEY, path, shape="map")
        verify_checksums_of(tensors, metadata, path, expected, sums)
    state = _unflatten(tensors, metadata, path)
    if state and all(k.startswith(_COMPILED_PREFIX) for k in state):  # saved from a compiled model by an earlier any4ao
        state = {k[len(_COMPILED_PREFIX) :]: v for k, v in state.items()}
    if model is not None:
        _install(_uncompiled(model), state, path)
    elif str(device) != "cpu":
        state = {k: v.to(device) for k, v in state.items()}
    return state


def verify_checksums_of(tensors, metadata, path, expected, computed=None) -> None:
    meta = [k[len("meta:") :] for k in expected if k.startswith("meta:")]
    stored = _json(metadata, "tensor_names", path, shape="names")
    any4 = [n for n in stored if n in metadata and '"Any4Tensor"' in metadata[n]]
    # save_quantized covers the name list and the aliases too (every readable format): without
    # them, an edited alias could point one layer at another's weight unchecked
    unchecked = [n for n in any4 + ["tensor_names", ALIASES_KEY] if n not in meta]
    if unchecked:
        raise ChecksumError(f"{path}: no checksum of the metadata of {unchecked[:5]} (edited file?)")
    verify_checksums(tensors, metadata, str(path), expected, meta_keys=meta, computed=computed)


def _slot(model: nn.Module, name: str):
    """(module, attribute, 'param' | 'buffer') that state key `name` loads into."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        return module, attr, "param"
    return module, attr, "buffer"


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"  # FSDP2 / TP shards: load_state_dict copies into them


def _check_fits(value: torch.Tensor, dtype: torch.dtype, where: str) -> None:
    """A plain floating tensor cast to a narrower dtype must not overflow to Inf (fp32 values
    beyond 65504 into an fp16 model): load_state_dict would cast them silently."""
    if not value.is_floating_point() or not dtype.is_floating_point or value.numel() == 0:
        return
    if torch.finfo(dtype).max >= torch.finfo(value.dtype).max:
        return
    peak = float(value.abs().amax())
    if peak != peak or peak == float("inf"):  # NaN / Inf stored as such are not this check's business
        finite = value[torch.isfinite(value)]
        peak = float(finite.abs().amax()) if finite.numel() else 0.0
    top = torch.tensor(torch.finfo(dtype).max, dtype=dtype)
    step = float(top) - float(torch.nextafter(top, torch.zeros((), dtype=dtype)))
    if peak >= float(top) + step / 2:  # round to nearest: below max + half a step still rounds to max
        raise CheckpointError(
            f"{where}: values up to {peak:.4g} in the file become Inf in this model's {dtype} "
            f"(largest finite {torch.finfo(dtype).max:.4g})"
        )


def _install(model: nn.Module, state: Dict[str, torch.Tensor], path: Path) -> None:
    """Check everything first, then change the model; a failure while changing it rolls back the
    parameters it replaced (the copies of plain tensors run last, after every check)."""
    current = model.state_dict(keep_vars=True)
    missing, unexpected = sorted(set(current) - set(state)), sorted(set(state) - set(current))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match this {type(model).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    shared = {}  # the model's tied parameters: one tensor under several names
    for name, target in current.items():
        first = shared.setdefault(id(target), name)
        if first != name and state[first] is not state[name] and not torch.equal(state[first], state[name]):
            raise CheckpointError(
                f"{path}: {first!r} and {name!r} are one tied parameter in this {type(model).__name__}, "
                "but the file holds different values for them (saved from an untied model, or from a tied one whose "
                "LM head alone was quantized, which unties it: load into an untied model)"
            )
    replace, copy = [], {}
    for name, value in state.items():
        target = current[name]
        if tuple(target.shape) != tuple(value.shape):
            raise CheckpointError(
                f"{path}: {name!r} has shape {tuple(value.shape)}, the model's is {tuple(target.shape)}"
            )
        module, attr, kind = _slot(model, name)
        if isinstance(value, Any4Tensor) or isinstance(target, Any4Tensor):
            if kind != "param":
                raise CheckpointError(
                    f"{path}: {name!r} is a buffer of the model; quantized tensors replace parameters"
                )
            device = target.qdata.device if isinstance(target, Any4Tensor) else target.device
            if target.dtype != value.dtype and value.is_floating_point():  # the model's dtype, as load_state_dict
                try:
                    value = value.to(target.dtype)
                except ValueError as e:  # (all or nothing here: without NarrowingError's note on model.to())
                    raise CheckpointError(f"{path}: {name!r}: {getattr(e, 'reason', e)}") from None
            grad = target.requires_grad and not isinstance(value, Any4Tensor)
            replace.append((id(target), module, attr, value, device, grad))
        else:
            if value.is_floating_point() != target.is_floating_point():
                raise CheckpointError(f"{path}: {name!r} is {value.dtype} in the file, {target.dtype} in the model")
            if type(target) not in (torch.Tensor, nn.Parameter) and not _is_dtensor(target):
                raise CheckpointError(
                    f"{path}: {name!r} is a {type(target).__name__} in this {type(model).__name__} (quantized by "
                    "another method?); the file holds plain values for it, which load_quantized copies into plain "
                    "tensors only"
                )
            _check_fits(value, target.dtype, f"{path}: {name!r}")
            copy[name] = value
    # build everything that goes in before changing anything
    made, new, used = {}, [], set()  # one new parameter per parameter of the model: tied names stay tied
    for target_id, m, a, v, d, g in replace:
        if target_id not in made:
            v = v.to(d)
            if id(v) in used:  # tied in the file, two parameters in this model: each gets its own parts
                v = v.clone()
            used.add(id(v))
            made[target_id] = nn.Parameter(v, requires_grad=g)
        new.append((m, a, made[target_id]))
    originals = [(m, a, m._parameters[a]) for m, a, _ in new]
    try:
        for module, attr, param in new:
            setattr(module, attr, param)
        model.load_state_dict(copy, strict=False)
    except BaseException:
        for module, attr, param in originals:
            setattr(module, attr, param)
        raise
