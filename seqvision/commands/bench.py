"""``seqvision bench``: seqvision's Sequencer2D against timm's and the deployment runtimes, in one run."""

from __future__ import annotations

import argparse

from ..bench import BenchSettings, run_cpu, run_gpu
from ..errors import UserError
from .common import image_size, positive_int, positive_int_list


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqvision bench",
        description=(
            "CPU benchmark of seqvision's Sequencer2D (fused and reference engines) against timm's Sequencer2D\n"
            "and ConvNeXt-T: img/s, ms/img, peak memory, GFLOP/s and fraction of GEMM peak, and each row's speed\n"
            "relative to timm's eager row (same dtype and batch): from the fastest rounds, and as the median (with\n"
            "quartiles) of the ratio within each interleaved round, which load changes between rounds do not move.\n\n"
            "int8 rows: torch's dynamic quantisation (LSTM and Linear weights int8, inference only).\n"
            'bf16 tables add the fused engine with its recurrent products in bf16 ("bf16 recurrence"; the fused\n'
            "rows otherwise keep them fp32). Inference tables add peer rows where installed (pip install\n"
            "'seqvision[deploy]'): OpenVINO (latency / throughput hint, bf16 where the CPU has bf16 hardware) and\n"
            "ONNX Runtime (fp32) on seqvision's ONNX export of the same weights; lines under the table give the\n"
            "bf16-recurrence A/B and seqvision's fastest row against OpenVINO's, paired round by round.\n"
            "A run stopped by SIGTERM (e.g. by `timeout`) prints the groups it finished and exits with 124.\n"
            "--device cuda runs the GPU benchmark instead (seqvision.bench.gpu: Triton engine, AMP, batch 256;\n"
            "eager rows, then torch.compile rows unless --no-compile).\n"
            "All rows share one process (and its memory allocator); for a training step as a run of its own sees\n"
            "it, each implementation in a fresh process with its page faults: benchmarks/bench_memory.py.\n\n"
            "examples:\n"
            "  seqvision bench --model sequencer2d_s --batch 1,8 --dtype fp32,bf16 --iters 10\n"
            "  seqvision bench --batch 8 --dtype fp32 --train --no-compile\n"
            "  seqvision bench --device cuda --batch 256"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="sequencer2d_s", help="Sequencer variant (default: sequencer2d_s)")
    parser.add_argument(
        "--batch", type=positive_int_list, help="comma-separated batch sizes (default: 1,8,32 on CPU, 256 on CUDA)"
    )
    parser.add_argument("--dtype", default="fp32,bf16", help="comma-separated: fp32, bf16, int8 (default: fp32,bf16)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda (the GPU benchmark)")
    parser.add_argument("--train", action="store_true", help="time a training step (fwd + bwd + AdamW)")
    parser.add_argument("--img-size", type=image_size, default=224, help="input resolution (default: 224)")
    parser.add_argument("--iters", type=positive_int, default=10, help="timed rounds per row (default: 10)")
    parser.add_argument("--warmup", type=positive_int, default=2, help="untimed steps per row (default: 2)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--no-convnext", action="store_true", help="skip the convnext_tiny row")
    parser.add_argument("--no-reference", action="store_true", help="skip seqvision's reference-engine rows")
    parser.add_argument("--no-peers", action="store_true", help="skip the OpenVINO and ONNX Runtime rows")
    return parser


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """The parsed command line as ``BenchSettings``."""
    return BenchSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()})


def run(args: argparse.Namespace) -> int:
    s = settings_from_args(args)
    if s.device.startswith("cuda"):
        return run_gpu(s)
    if s.device != "cpu":
        raise UserError(f"--device must be cpu or cuda, got {s.device!r}")
    return run_cpu(s)
