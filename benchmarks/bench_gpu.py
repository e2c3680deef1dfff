"""GPU throughput of seqvision's Sequencer2D (Triton engine) against timm's sequencer2d_s/m/l and convnext_tiny.

    python benchmarks/bench_gpu.py                      # every model, AMP bf16, batch 256, inference and training
    python benchmarks/bench_gpu.py --modes infer --models seqvision:sequencer2d_s timm:sequencer2d_s
    python benchmarks/bench_gpu.py --json results.json
    python benchmarks/bench_gpu.py --engine triton,reference      # seqvision rows with Triton and with cuDNN
    python benchmarks/bench_gpu.py --also-compiled --modes infer  # eager rows, then under torch.compile

Every option of ``seqvision.bench.gpu.benchmark`` (``seqvision bench --device cuda`` runs a fixed choice of them).
Without a CUDA device it prints a message and exits with status 0 (``--device cpu`` is a smoke test).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Sequence

import torch

from seqvision.bench.gpu import DEFAULT_MODELS, ENGINES, benchmark, format_table
from seqvision.commands.common import non_negative_int, positive_int


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_gpu",
        description=(__doc__ or "").split("\n")[0],
        epilog="example: python benchmarks/bench_gpu.py --modes infer --batch 256 --amp bf16",
    )
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="seqvision:<name> / timm:<name>")
    p.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    p.add_argument("--batch", type=positive_int, default=256)
    p.add_argument("--img-size", type=positive_int, default=224)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test of the code path)")
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"])
    p.add_argument(
        "--engine",
        default="triton",
        help=f"BiLSTM2D engine(s) for the seqvision models, comma-separated: {', '.join(ENGINES)}",
    )
    p.add_argument("--warmup", type=non_negative_int, default=5)
    p.add_argument("--iters", type=positive_int, default=20)
    p.add_argument("--compile", action="store_true", help="run every model under torch.compile (static shapes)")
    p.add_argument("--also-compiled", action="store_true", help="eager rows, then the same under torch.compile")
    p.add_argument(
        "--profile", type=non_negative_int, default=0, metavar="N", help="print each row's N most expensive kernels"
    )
    p.add_argument("--json", help="also write the results to this file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device available; nothing to benchmark (use --device cpu for a smoke test).")
        return 0
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name(args.device)}, torch {torch.__version__}")
    run = functools.partial(
        benchmark, args.models, args.modes, args.batch, args.img_size, args.device, args.amp, args.engine,
        args.warmup, args.iters,
    )  # fmt: skip
    results = run(compile=args.compile, profile=args.profile)
    if args.also_compiled and not args.compile:
        results += run(compile=True)
    print()
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
