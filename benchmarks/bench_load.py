"""What load-time validation and checksums cost: load_quantized of a 1e8-weight any4 checkpoint.

The checkpoint: 24 linear layers of 2048 x 2048 (100.7 M weights), bf16, 4-bit codes, group 128
(random codes, sorted random LUTs, positive scales: quantization itself is not measured), 55 MB.
Timed, each the median (and the minimum) of --repeats runs:
  none       load_quantized with the value checks switched off and verify_checksums=False: reading
             every byte into memory the tensors own (load_quantized does not map the file, whose
             bytes could then change after they were verified), unflattening, and the structural
             checks every construction runs
  values     + the value checks (verify_checksums=False)
  checksums  + the checksum (xxh3_64) of every tensor and metadata entry (the default; each 256 KiB
             piece is hashed right after it is read, while it is in the CPU's cache)
For the state dict alone and installed into a model, with the file in the page cache ("warm") and
evicted from it by posix_fadvise(DONTNEED) before each run ("cold": read from disk). The levels
take turns (one run of each, --repeats times), so drift in the allocator's and the page cache's
state falls on all of them alike.
--chunk-sweep 128,256,1024,4096 also times the read alone (serialization._read, page cache) with
and without hashing for each read piece size in KiB, the sizes taking turns.
--threads 1,4,8 repeats every measurement with ANY4AO_LOAD_THREADS set to each count (threads that
read and hash the file's tensors, each its own shard; the variable overrides the automatic choice),
the counts taking turns with the levels. Without it the loads use the automatic choice
(serialization._read_workers: 1 on fewer than 4 cores, else half the cores, at most 8).
Writes benchmarks/results/load-validation-cpu.json.

    python benchmarks/bench_load.py [--repeats 15] [--nbits 4] [--chunk-sweep 128,256,1024,4096] [--threads 1,4,8]
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import any4ao
from any4ao import Any4Tensor, serialization

RESULTS = Path(__file__).resolve().parent / "results" / "load-validation-cpu.json"


def build(layers: int, n: int, k: int, group: int, nbits: int) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(*[nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device="meta") for _ in range(layers)])
    for lin in model:
        codes = torch.randint(0, 2**nbits, (n, k), dtype=torch.uint8, generator=g)
        lut = torch.randn(n, 2**nbits, generator=g).sort(1).values.bfloat16()
        scale = (torch.rand(n, k // group, generator=g) + 0.01).bfloat16()
        zero = torch.randn(n, k // group, generator=g).bfloat16()
        w = Any4Tensor.from_codes(codes, lut, scale, zero, nbits, group)
        lin.weight = nn.Parameter(w, requires_grad=False)
    return model


def fresh_model(layers, n, k) -> nn.Module:
    return nn.Sequential(*[nn.Linear(k, n, bias=False, dtype=torch.bfloat16) for _ in range(layers)])


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn, repeats: int, cold_path=None):
    times = []
    for _ in range(repeats):
        if cold_path is not None:
            evict(cold_path)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def chunk_sweep(path: Path, sizes_kib, repeats: int) -> dict:
    """{size: read and read+hash medians} of serialization._read for each piece size, taking turns."""
    shipped = serialization._READ_CHUNK
    times = {(kib, hashed): [] for kib in sizes_kib for hashed in (False, True)}
    try:
        for _ in range(repeats):
            for kib in sizes_kib:
                serialization._READ_CHUNK = kib << 10
                for hashed in (False, True):
                    t0 = time.perf_counter()
                    out = serialization._read(path, hash_tensors=hashed)
                    times[(kib, hashed)].append(time.perf_counter() - t0)
                    del out
    finally:
        serialization._READ_CHUNK = shipped
    sweep = {}
    for kib in sizes_kib:
        read, hashed = (statistics.median(times[(kib, h)]) for h in (False, True))
        sweep[f"{kib}KiB"] = {
            "read_s": round(read, 5),
            "read_and_hash_s": round(hashed, 5),
            "hash_overhead": round(hashed / read - 1, 4),
        }
        print(
            f"read pieces {kib:5d} KiB: read {read * 1e3:6.2f} ms, read + hash {hashed * 1e3:6.2f} ms (+{100 * (hashed / read - 1):.0f} %)"
        )
    return sweep


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--nbits", type=int, default=4, choices=(2, 3, 4))
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--chunk-sweep", default="", help="read piece sizes in KiB, comma-separated")
    p.add_argument("--threads", default="", help="ANY4AO_LOAD_THREADS values to compare, comma-separated")
    args = p.parse_args(argv)
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else [None]  # None: automatic
    if any(t is not None and t < 1 for t in thread_counts):
        p.error("--threads: counts must be >= 1")
    layers, n, k, group = 24, 2048, 2048, 128
    work = Path(tempfile.mkdtemp(prefix="any4ao-bench-load-"))
    path = work / "model.safetensors"
    any4ao.save_quantized(build(layers, n, k, group, args.nbits), path)
    # first, in a fresh heap: after the loads below, reads into new tensors page-fault more (26 ms
    # against 8 ms for the same read on the CI machine)
    sweep = chunk_sweep(path, [int(c) for c in args.chunk_sweep.split(",")], args.repeats) if args.chunk_sweep else None
    model = fresh_model(layers, n, k)
    real_check = serialization.check_all_values

    env = serialization.LOAD_THREADS_ENV
    user_threads = os.environ.get(env)

    def load(values: bool, checksums: bool, into_model: bool, threads):
        def run():
            serialization.check_all_values = real_check if values else (lambda tensors, where="": None)
            if threads is not None:
                os.environ[env] = str(threads)
            try:
                any4ao.load_quantized(path, model if into_model else None, verify_checksums=checksums)
            finally:
                serialization.check_all_values = real_check
                if user_threads is None:
                    os.environ.pop(env, None)
                else:
                    os.environ[env] = user_threads

        return run

    def row_key(cache, target, threads):
        return f"{cache}/{target}" if threads is None else f"{cache}/{target}/threads={threads}"

    def summarise(row, cache, target):
        base = row["none"]["median_s"]
        row["values_overhead"] = round(row["values"]["median_s"] / base - 1, 4)
        row["values_and_checksums_overhead"] = round(row["checksums"]["median_s"] / base - 1, 4)
        low = row["none"]["min_s"]
        row["values_overhead_of_min"] = round(row["values"]["min_s"] / low - 1, 4)
        row["values_and_checksums_overhead_of_min"] = round(row["checksums"]["min_s"] / low - 1, 4)
        print(
            f"{cache:4s} {target:10s} threads {row['threads']:2d}  none {base * 1e3:7.1f} ms  values "
            f"{row['values']['median_s'] * 1e3:7.1f} ms (+{100 * row['values_overhead']:.1f} %)  checksums "
            f"{row['checksums']['median_s'] * 1e3:7.1f} ms (+{100 * row['values_and_checksums_overhead']:.1f} %);  "
            f"min: none {low * 1e3:.1f}, values +{100 * row['values_overhead_of_min']:.1f} %, checksums "
            f"+{100 * row['values_and_checksums_overhead_of_min']:.1f} %"
        )
        return row

    # the threads of the loads without --threads: the automatic choice (or the caller's ANY4AO_LOAD_THREADS)
    auto_threads = serialization._read_workers(path.stat().st_size)
    results = {}
    for cache in ("warm", "cold"):
        for target in ("state_dict", "model"):
            levels = {"none": (False, False), "values": (True, False), "checksums": (True, True)}
            fns = {
                (threads, level): load(values, sums, target == "model", threads)
                for threads in thread_counts
                for level, (values, sums) in levels.items()
            }
            for fn in fns.values():
                fn()  # warm-up (and page cache for "warm")
            # the levels (and thread counts) take turns, run after run: the allocator's and page cache's
            # state drifts over a run of loads (blocks of one level measured 8 to 29 ms for the same load)
            times = {run: [] for run in fns}
            for _ in range(args.repeats):
                for run, fn in fns.items():
                    times[run].append(timed(fn, 1, path if cache == "cold" else None)[0])
            for threads in thread_counts:
                row = {
                    level: {
                        "median_s": round(statistics.median(ts), 5),
                        "min_s": round(min(ts), 5),
                        "runs_s": [round(t, 5) for t in ts],
                    }
                    for (t, level), ts in times.items()
                    if t == threads
                }
                row["threads"] = threads if threads is not None else auto_threads
                results[row_key(cache, target, threads)] = summarise(row, cache, target)
    # the checks alone, on one loaded state dict (free of the allocator's page-fault noise that
    # dominates the end-to-end spread on this shared 2-core machine)
    from any4ao.validation import checksums as hash_all

    state = any4ao.load_quantized(path, verify_checksums=False)
    any4 = {k: v for k, v in state.items() if isinstance(v, Any4Tensor)}
    parts = {f"{k}.{p}": getattr(v, p) for k, v in any4.items() for p in Any4Tensor.tensor_data_names}
    components = {"read_chunk_sweep": sweep} if sweep else {}
    for label, fn in {
        "value_checks": lambda: real_check(any4, str(path)),
        "checksums_all_tensors": lambda: hash_all(parts),
    }.items():
        fn()
        median, times = timed(fn, args.repeats)
        components[label] = {"median_s": round(median, 5), "min_s": round(min(times), 5)}
        print(f"{label:22s} {median * 1e3:6.1f} ms (min {min(times) * 1e3:.1f})")
    reference = 1 if 1 in thread_counts else thread_counts[0]  # the serial read when it was measured
    for key in ("warm/model", "cold/model"):
        base = results[row_key(*key.split("/"), reference)]["none"]["median_s"]
        components[f"value_checks_over_{key.replace('/', '_')}_load"] = round(
            components["value_checks"]["median_s"] / base, 4
        )
        components[f"checksums_over_{key.replace('/', '_')}_load"] = round(
            components["checksums_all_tensors"]["median_s"] / base, 4
        )
    import safetensors
    import torchao

    report = {
        "command": "python benchmarks/bench_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "checkpoint": {
            "layers": layers,
            "shape": [n, k],
            "weights": layers * n * k,
            "dtype": "bfloat16",
            "nbits": args.nbits,
            "group_size": group,
            "file_mb": round(path.stat().st_size / 1e6, 2),
        },
        "repeats": args.repeats,
        "results": results,
        "components": components,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchao": torchao.__version__,
            "safetensors": safetensors.__version__,
            "any4ao": any4ao.__version__,
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "load_threads": [t if t is not None else "auto" for t in thread_counts],
            "auto_load_threads": auto_threads,
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    path.unlink()
    work.rmdir()
    print("wrote", args.out)
    return report


if __name__ == "__main__":
    main()
