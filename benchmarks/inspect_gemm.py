"""What Triton made of lut_gemm for a few configs: registers, spills, shared memory and the counts of
the operations that say how the K loop runs (asynchronous copies, layout conversions through
shared memory, wgmma), from the compiled kernel's TTGIR. Also the target of an ncu run (--launches).

    python benchmarks/inspect_gemm.py [--out DIR] [--shape 14336x4096] [--m 128] [--launches 0]
        [--tiles 128x128x128x1x1x8x3,...]   (block_m x block_n x block_k x split_k x swap_ab x num_warps x num_stages
                                             [x pair_dot: 1 takes pair_dot without prefetch, else both prefetches])

The same resource figures without a GPU: benchmarks/inspect_compile.py.
"""

import argparse

import torch
from bench_kernels import GROUP, result_meta, write_rows

from any4ao import Any4Tensor
from any4ao.kernels import launch
from any4ao.kernels.lut_gemm import lut_gemm_kernel
from any4ao.kernels.selector import GemmConfig

# (block_m, block_n, block_k, split_k, swap_ab, num_warps, num_stages), each without and with prefetch
TILES = "128x128x128x1x1x8x3,256x64x64x1x0x8x3"
OPS = {
    "async copies": "ttg.async_copy_global_to_local",
    "layout conversions": "ttg.convert_layout",
    "shared allocs": "ttg.local_alloc",
    "wgmma": "ttng.warp_group_dot ",
    "mma.sync": "tt.dot ",
}


def _compiled():
    """Every compiled lut_gemm kernel (the first entry of each device cache is the kernel cache in
    triton 3.x)."""
    return {id(v): v for cache in lut_gemm_kernel.device_caches.values() for v in cache[0].values()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--shape", default="14336x4096")
    p.add_argument("--m", type=int, default=128)
    p.add_argument("--launches", type=int, default=0, help="only launch each config this many times (ncu)")
    p.add_argument("--tiles", default=TILES)
    args = p.parse_args()
    n, k = (int(v) for v in args.shape.split("x"))
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    q = Any4Tensor.from_hp(w, group_size=GROUP, kmeans_iterations=2)
    x = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16)
    qargs = (q.qdata, q.lut, q.scale, q.zero_point, 4, GROUP)
    configs = []
    for tile in args.tiles.split(","):
        bm, bn, bk, split, swap, warps, stages, *pair = (int(v) for v in tile.split("x"))
        for pf in (False,) if pair and pair[0] else (False, True):
            configs.append(
                GemmConfig(bm, bn, bk, split, 8, bool(swap), warps, stages, pf, pair_dot=bool(pair and pair[0]))
            )
    if args.launches:
        for cfg in configs:
            for _ in range(args.launches):
                launch.lut_gemm(x, *qargs, cfg)
        torch.cuda.synchronize()
        return
    rows = []
    for cfg in configs:
        before = _compiled()
        launch.lut_gemm(x, *qargs, cfg)
        torch.cuda.synchronize()
        (kernel,) = [v for key, v in _compiled().items() if key not in before]  # this config's compile
        ttgir = kernel.asm["ttgir"]
        row = {"config": str(cfg), "regs": kernel.n_regs, "spills": kernel.n_spills, "shared": kernel.metadata.shared}
        row |= {name: ttgir.count(op) for name, op in OPS.items()}
        rows.append(row)
        print(row, flush=True)
    meta = result_meta()
    write_rows(args.out, "inspect-gemm", meta, rows)


if __name__ == "__main__":
    main()
