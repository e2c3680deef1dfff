"""What the Triton BiLSTM2D kernels need per block on each NVIDIA GPU generation, without a GPU.

Compiles the forward and backward kernels ahead of time for several compute capabilities (Triton's own ptxas)
and prints registers and stack bytes per thread (where spilled registers go) and shared memory per block,
against each generation's per-block limit (CUDA C++ Programming Guide, compute capability table). A kernel whose shared
memory is over the limit fails at its first launch on such a GPU, and the engine falls back to its next
candidate setting or to cuDNN (``seqvision.ops.triton_lstm._candidates``).

    python benchmarks/triton_resources.py                 # bf16, Sequencer2D's hidden sizes, sm_80/86/89/90
    python benchmarks/triton_resources.py --sm 89 --dtype fp16 --warps 4

Needs only triton (no torch, no GPU): the kernel module is loaded from its file.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "seqvision" / "ops" / "_triton_kernels.py"
# Shared memory per block, opt-in maximum, bytes: T4 / RTX 20xx (7.5, no bf16), A100 (8.0), RTX 30xx / A10 (8.6),
# RTX 40xx / L4 (8.9), H100 (9.0).
SMEM_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
GPUS = {75: "T4", 80: "A100", 86: "RTX 30xx", 89: "RTX 40xx", 90: "H100"}
# name -> (D, BLOCK_A, BLOCK_B): Sequencer2D's hidden sizes, held in one padded piece or split in two.
LAYOUTS = {
    "D=48 one piece (64)": (48, 64, 0),
    "D=48 split 32+16": (48, 32, 16),
    "D=96 one piece (128)": (96, 128, 0),
    "D=96 split 64+32": (96, 64, 32),
}


def _load_kernels():
    spec = importlib.util.spec_from_file_location("seqvision_triton_kernels", KERNELS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _signature(kernel, dtype: str) -> dict[str, str]:
    """Argument types: pointers in the compute dtype except the fp32 cell states, int32 scalars."""
    sig = {}
    for p in kernel.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*fp32" if p.name == "c_ptr" else f"*{dtype}"
        else:
            sig[p.name] = "i32"
    return sig


def compile_one(kernel, dtype: str, sm: int, layout: tuple[int, int, int], block_n: int, warps: int, prefetch: bool):
    """(registers, spilled bytes, shared bytes) of one kernel compiled for compute capability ``sm``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _, block_a, block_b = layout
    constexprs = dict(NDIR=4, BLOCK_N=block_n, BLOCK_A=block_a, BLOCK_B=block_b, UPCAST_DOT=False, PREFETCH=prefetch)
    constexprs["PRECISION"] = "ieee" if dtype == "fp32" else "tf32"
    if "SAVE" in [p.name for p in kernel.params]:
        constexprs["SAVE"] = True  # the training forward: the larger of the two
    src = ASTSource(fn=kernel, signature=_signature(kernel, dtype), constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", sm, 32), options=dict(num_warps=warps, num_stages=1))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run(
            [str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return int(m.group(1)), int(m.group(2)), compiled.metadata.shared


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python benchmarks/triton_resources.py --sm 86 89 --dtype bf16",
    )
    p.add_argument("--sm", type=int, nargs="+", default=[80, 86, 89, 90], help="compute capabilities x 10 (75: fp16)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--block-n", type=int, default=16, help="sequences per program")
    p.add_argument("--warps", type=int, default=8)
    p.add_argument("--no-prefetch", action="store_true")
    p.add_argument("--layout", default="", help="only the hidden-state layouts whose name contains this, e.g. D=96")
    args = p.parse_args(argv)

    import triton

    kernels = _load_kernels()
    print(f"triton {triton.__version__}, {args.dtype}, BLOCK_N={args.block_n}, {args.warps} warps, "
          f"prefetch {'off' if args.no_prefetch else 'on'}")
    print("| GPU (sm) | hidden state | kernel | registers | stack bytes | shared KiB | limit KiB | fits |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for sm in args.sm:
        limit = SMEM_LIMIT.get(sm)
        for name, layout in ((n, v) for n, v in LAYOUTS.items() if args.layout in n):
            for kname, kernel in (("forward", kernels.lstm2d_fwd_kernel), ("backward", kernels.lstm2d_bwd_kernel)):
                try:
                    regs, spill, shared = compile_one(
                        kernel, args.dtype, sm, layout, args.block_n, args.warps, not args.no_prefetch
                    )
                except Exception as e:  # noqa: BLE001 - report and go on with the other settings
                    print(f"| {GPUS.get(sm, '?')} ({sm}) | {name} | {kname} | error: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:80]} | | | | |")
                    continue
                fits = "?" if limit is None else ("yes" if shared <= limit else "NO")
                lim = "?" if limit is None else f"{limit / 1024:.0f}"
                print(f"| {GPUS.get(sm, '?')} ({sm}) | {name} | {kname} | {regs} | {spill} | {shared / 1024:.0f} | "
                      f"{lim} | {fits} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
