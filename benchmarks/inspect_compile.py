"""lut_gemm and lut_mma configs compiled for Hopper (sm_90a) on any machine, GPU or not: registers,
spills, shared memory, CTAs per SM, the TTGIR operations that say how the K loop runs, and the K
loop's SASS per looked-up weight (all instructions, ALU-pipe ones, byte permutes).

    python benchmarks/inspect_compile.py [--tiles 128x128x64x8x3,...] [--swap both] [--prefetch both]
        [--mma 8x1x4x1,...] [--ws 128x128x4,128x128x4x2,...] [--out DIR]

Triton compiles and ptxas assembles here without a GPU, so a config's resource use costs no device
time. Integer arguments and pointers carry the divisibility-by-16 hint the GPU launcher gives them
(M does not: prefill lengths are arbitrary), so the code is what the GPU runs for those shapes. Use
the triton version of the GPU machine (3.6.0 there: `pip install triton==3.6.0` into a spare venv);
the report records which one compiled it.
"""

import argparse
import collections
import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def _kernel_module(name):
    """kernels/<name>.py of this checkout as any4ao.kernels.<name>, importing only triton: the compile
    needs no torch, so a spare venv with the GPU machine's triton version is enough."""
    kernels = Path(__file__).resolve().parent.parent / "kernels"
    if "any4ao" not in sys.modules:
        sys.modules["any4ao"] = types.ModuleType("any4ao")
        package = types.ModuleType("any4ao.kernels")
        package.__path__ = [str(kernels)]
        sys.modules["any4ao.kernels"] = package
    spec = importlib.util.spec_from_file_location(f"any4ao.kernels.{name}", kernels / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


lut_gemm_kernel = _kernel_module("lut_gemm").lut_gemm_kernel
lut_mma_kernel = _kernel_module("lut_mma").lut_mma_kernel

HOPPER = GPUTarget("cuda", 90, 32)
REGISTERS_PER_SM, SHARED_PER_SM, MAX_WARPS_PER_SM = 65536, 227 * 1024, 64
TTGIR_OPS = {
    "async_copies": "ttg.async_copy_global_to_local",
    "shared_allocs": "ttg.local_alloc",
    "shared_loads": "ttg.local_load",
    "layout_conversions": "ttg.convert_layout",
    "wgmma": "ttng.warp_group_dot ",
}
# integer and logic operations (the ALU pipe, which the byte-permute lookup loads)
ALU_OPS = {"PRMT", "LOP3", "SEL", "ISETP", "IADD3", "SHF", "LEA", "VIMNMX", "IMNMX", "PLOP3", "SGXT", "BMSK", "MOV"}
GEMM_SIGNATURE = {
    "x_ptr": "*bf16",
    "qw_ptr": "*i32",
    "lutw_ptr": "*i32",
    "s_ptr": "*bf16",
    "z_ptr": "*bf16",
    "out_ptr": "*bf16",
    "part_ptr": "*fp32",
    "count_ptr": "*i32",
    **{name: "i32" for name in ("M", "N", "K", "stride_xm", "stride_qw", "stride_sn", "stride_os", "stride_om")},
}

MMA_SIGNATURE = {
    "x_ptr": "*i32",
    "qw_ptr": "*i32",
    "lut_words_ptr": "*i32",
    "s_ptr": "*bf16",
    "z_ptr": "*bf16",
    "out_ptr": "*bf16",
    **{n: "i32" for n in ("M", "N", "K", "stride_xw", "stride_qw", "stride_sn", "stride_os", "stride_om", "pow2_16")},
    "pow2_31": "u32",
}


def compile_sm90(kernel, signature, constexprs, num_warps, num_stages, unaligned=("M",)):
    """The kernel compiled for sm_90a, every argument but `unaligned` hinted divisible by 16."""
    names = kernel.arg_names
    sig = dict(signature) | {name: "constexpr" for name in constexprs}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in signature if a not in unaligned}
    src = ASTSource(kernel, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=HOPPER, options={"num_warps": num_warps, "num_stages": num_stages})


def _tool(name):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resources(compiled):
    """Registers and stack-frame bytes per thread (register spills: the kernels hold no local arrays)
    of the cubin triton built, from cuobjdump (the metadata has them only after a load on a GPU)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp, "k.cubin")
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run(
            [_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    return regs, stack


def loop_sass(compiled, holding=None):
    """Opcode counts of the longest loop (a backward branch) in the kernel's SASS: the K loop. With
    `holding` (an opcode prefix), the shortest loop that has one: in a warp-specialised kernel the
    longest backward branch spans partitions and waits, not one partition's loop."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp, "k.cubin")
        cubin.write_bytes(compiled.asm["cubin"])
        text = subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    labels, instructions = {}, []
    for line in text.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        ins = re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if ins:
            instructions.append(ins.group(1).strip())
    loops = []
    for i, ins in enumerate(instructions):
        target = re.search(r"BRA\s+`?\(?\.(L_x_\d+)", ins)
        if target and labels.get(target.group(1), i) < i:
            loops.append((labels[target.group(1)], i))
    if holding is None:
        loop = max(loops, key=lambda span: span[1] - span[0], default=(0, -1))
    else:
        spans = [(a, b) for a, b in loops if any(ins.startswith(holding) for ins in instructions[a : b + 1])]
        loop = min(spans, key=lambda span: span[1] - span[0], default=(0, -1))
    ops = collections.Counter(
        re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0] for ins in instructions[loop[0] : loop[1] + 1]
    )
    return ops


def ctas_per_sm(regs, shared, num_warps):
    threads = 32 * num_warps
    by_regs = REGISTERS_PER_SM // (threads * (-(-regs // 8) * 8))
    by_shared = SHARED_PER_SM // max(shared + 1024, 1)  # 1 KB per CTA reserved by the driver
    return min(by_regs, by_shared, MAX_WARPS_PER_SM // num_warps)


def summary(compiled, num_warps, weights_per_thread):
    """Resources, occupancy, the TTGIR operations and the K loop's SASS per looked-up weight."""
    regs, stack = resources(compiled)
    ttgir = compiled.asm["ttgir"]
    k_loop = ttgir[ttgir.find("scf.for") : ttgir.find("scf.yield")]  # the first loop: the K loop
    ops = loop_sass(compiled)
    alu = sum(n for op, n in ops.items() if op.split(".")[0] in ALU_OPS)
    return {
        "registers": regs,
        "stack_bytes": stack,
        "shared_bytes": compiled.metadata.shared,
        "ctas_per_sm": ctas_per_sm(regs, compiled.metadata.shared, num_warps),
        **{name: ttgir.count(op) for name, op in TTGIR_OPS.items()},
        # a layout conversion in the K loop goes through shared memory behind a bar.sync
        "loop_conversions": k_loop.count("ttg.convert_layout"),
        "loop_bar_syncs": sum(n for op, n in ops.items() if op.startswith("BAR.SYNC")),
        "last_wgmma_wait": (re.findall(r"pendings = (\d+)", ttgir) or ["-"])[-1],
        "loop_instructions": sum(ops.values()),
        "loop_instructions_per_weight": round(sum(ops.values()) / weights_per_thread, 2),
        "loop_alu_per_weight": round(alu / weights_per_thread, 2),
        "loop_prmt_per_weight": round(ops["PRMT"] / weights_per_thread, 2),
        "loop_opcodes": dict(ops.most_common(12)),
    }


def report_gemm(block_m, block_n, block_k, num_warps, num_stages, swap_ab, prefetch, pair_dot=False, group=128):
    constexprs = dict(
        LUT_SIZE=16,
        GROUP=group,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=8,
        SPLIT_K=1,
        SWAP_AB=swap_ab,
        LUT_FP16=False,
        PAIR_FMA=True,
        USE_ASM=True,
        PREFETCH=prefetch,
        INTERPRET=False,
        PAIR_DOT=pair_dot,
    )
    compiled = compile_sm90(lut_gemm_kernel, GEMM_SIGNATURE, constexprs, num_warps, num_stages)
    config = {"kernel": "lut_gemm", "tile": f"{block_m}x{block_n}x{block_k}", "num_warps": num_warps}
    config |= {"num_stages": num_stages, "swap_ab": swap_ab, "prefetch": prefetch, "pair_dot": pair_dot}
    # one thread looks up block_n x block_k / threads weights per K step
    return config | summary(compiled, num_warps, block_n * block_k / (32 * num_warps))


def report_mma(block_m, row_tiles, k_warps, prefetch, group=128):
    """A lut_mma launch as launch.lut_mma makes it (4 code words per lane and row per step at
    group 128, every warp the same number of groups)."""
    constexprs = dict(
        LUT_SIZE=16,
        GROUP=group,
        V=4,
        ROW_WARPS=1,
        K_WARPS=k_warps,
        N_TILES=block_m // 8,
        SPLIT_K=1,
        SPREAD=False,
        LUT_FP16=False,
        USE_ASM=True,
        ROW_TILES=row_tiles,
        PREFETCH=prefetch,
        EVEN=True,
    )
    compiled = compile_sm90(lut_mma_kernel, MMA_SIGNATURE, constexprs, k_warps, 3, unaligned=("M", "pow2_31"))
    config = {"kernel": "lut_mma", "block_m": block_m, "row_tiles": row_tiles, "k_warps": k_warps}
    # a lane looks up V = 4 words of 8 codes for each of its 2 rows per row tile per step
    return config | {"prefetch": prefetch} | summary(compiled, k_warps, 4 * 8 * 2 * row_tiles)


WS_SIGNATURE = {
    "lutw_ptr": "*i32",
    "s_ptr": "*bf16",
    "z_ptr": "*bf16",
    "out_ptr": "*bf16",
    **{name: "i32" for name in ("M", "N", "K", "stride_sn", "stride_om", "stride_os")},
}


def report_ws(block_m, block_n, stages, split_k=1, lookup_warps=4, lookup_regs=None, group=128):
    """The warp-specialised Gluon kernel as launch.lut_gemm_ws makes it (bf16, 64-column steps):
    resources, and the lookup loop's SASS per weight (one W row per lookup thread, two at block_n 64)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    module = _kernel_module("lut_gemm_ws")
    lookup_regs = lookup_regs or module.LOOKUP_REGISTERS[lookup_warps]  # as launch.lut_gemm_ws
    kernel = module.lut_gemm_ws_kernel
    x_layout, q_layout = module.tile_layouts()
    constexprs = dict(
        GROUP=group,
        BLOCK_N=block_n,
        STAGES=stages,
        SPLIT_K=split_k,
        FP16=False,
        LOOKUP_REGS=lookup_regs,
        LOOKUP_WARPS=lookup_warps,
        num_warps=4,
    )
    sig = {
        "x_desc": f"tensordesc<bf16[{block_m}, 64],{x_layout!r}>",
        "q_desc": f"tensordesc<u8[{block_n}, 32],{q_layout!r}>",
        **WS_SIGNATURE,
        **({"out_ptr": "*fp32"} if split_k > 1 else {}),  # float32 partial sums
    } | {name: "constexpr" for name in constexprs}
    compiled = triton.compile(GluonASTSource(kernel, sig, constexprs), target=HOPPER, options={"num_warps": 4})
    regs, stack = resources(compiled)
    ops = loop_sass(compiled, holding="HFMA2")  # the lookup partition's loop (its pair FMAs)
    per_thread = block_n * 64 / (32 * lookup_warps)
    return {
        "kernel": "lut_gemm_ws",
        "tile": f"{block_m}x{block_n}x{stages}x{split_k}, lookup {lookup_warps} warps / {lookup_regs} registers",
        "warps": compiled.metadata.num_warps,
        "registers": regs,
        "stack_bytes": stack,
        "shared_bytes": compiled.metadata.shared,
        "loop_instructions_per_weight": round(sum(ops.values()) / per_thread, 2),
        "loop_prmt_per_weight": round(ops["PRMT"] / per_thread, 2),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiles", default="128x128x64x8x3,128x128x128x8x3,256x128x64x8x3,128x128x64x16x3,256x128x64x16x3")
    p.add_argument("--swap", default="both", choices=["both", "on", "off"])
    p.add_argument("--prefetch", default="both", choices=["both", "on", "off"])
    p.add_argument(
        "--pair-dot", default="both", choices=["both", "on", "off"], help="pair_dot (swap_ab, block_k >= 64)"
    )
    p.add_argument(
        "--mma", default="8x1x4x1,16x2x4x1,32x2x4x2", help="lut_mma: block_m x row_tiles x k_warps x prefetch"
    )
    p.add_argument(
        "--ws",
        default="",
        help="lut_gemm_ws (Gluon): block_m x block_n x stages [x split_k [x lookup warps [x lookup registers]]], e.g. 128x128x4",
    )
    p.add_argument("--out", default="", help="also write inspect-compile-sm90.json there")
    args = p.parse_args()
    choice = {"both": (False, True), "on": (True,), "off": (False,)}
    rows = []
    print(f"triton {triton.__version__}, sm_90a")
    print(
        "lut_gemm tile  warps  swap    pf  pair regs stack smem_KB CTAs/SM async allocs loads convs bars wait instr/w"
        "  alu/w prmt/w"
    )
    for tile in filter(None, args.tiles.split(",")):
        bm, bn, bk, warps, stages = (int(v) for v in tile.split("x"))
        for swap, pf, pair in itertools.product(choice[args.swap], choice[args.prefetch], choice[args.pair_dot]):
            if pair and (not swap or bk < 64):
                continue
            r = report_gemm(bm, bn, bk, warps, stages, swap, pf, pair)
            rows.append(r)
            print(
                f"{r['tile']:<14} {warps:>5} {str(swap):>5} {str(pf):>5} {str(pair):>5} {r['registers']:>4} "
                f"{r['stack_bytes']:>5} {r['shared_bytes'] // 1024:>7} {r['ctas_per_sm']:>7} {r['async_copies']:>5} "
                f"{r['shared_allocs']:>6} {r['shared_loads']:>5} {r['loop_conversions']:>5} {r['loop_bar_syncs']:>4} "
                f"{r['last_wgmma_wait']:>4} {r['loop_instructions_per_weight']:>7} "
                f"{r['loop_alu_per_weight']:>6} {r['loop_prmt_per_weight']:>6}",
                flush=True,
            )
    print("lut_mma block_m row_tiles k_warps prefetch regs stack CTAs/SM instr/w  alu/w prmt/w")
    for spec in filter(None, args.mma.split(",")):
        bm, rt, kw, pf = (int(v) for v in spec.split("x"))
        r = report_mma(bm, rt, kw, pf)
        rows.append(r)
        print(
            f"{'':8}{bm:>7} {rt:>9} {kw:>7} {pf:>8} {r['registers']:>4} {r['stack_bytes']:>5} {r['ctas_per_sm']:>7} "
            f"{r['loop_instructions_per_weight']:>7} {r['loop_alu_per_weight']:>6} {r['loop_prmt_per_weight']:>6}",
            flush=True,
        )
    for spec in filter(None, args.ws.split(",")):
        r = report_ws(*(int(v) for v in spec.split("x")))
        rows.append(r)
        print(
            f"lut_gemm_ws {r['tile']}: {r['warps']} warps, {r['registers']} registers, {r['stack_bytes']} stack bytes, "
            f"{r['shared_bytes'] // 1024} KB shared; lookup loop {r['loop_instructions_per_weight']} instructions "
            f"and {r['loop_prmt_per_weight']} PRMT per weight",
            flush=True,
        )
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        meta = {"triton": triton.__version__, "target": "sm_90a", "command": " ".join(sys.argv)}
        Path(args.out, "inspect-compile-sm90.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
