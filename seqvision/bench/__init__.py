"""Speed and memory of seqvision's Sequencer2D against timm and the deployment runtimes, measured in one run:
``run_cpu`` (seqvision's engines, timm eager and compiled, convnext_tiny, OpenVINO and ONNX Runtime on the CPU)
and ``run_gpu`` (the Triton engine against timm on CUDA), both driven by ``BenchSettings``."""

from .cpu import Row, baseline_for, comparisons, make_step, run_cpu, speed_ratios
from .gpu import benchmark, format_table, run_gpu
from .settings import BenchSettings, seeded_model

__all__ = [
    "BenchSettings",
    "Row",
    "baseline_for",
    "benchmark",
    "comparisons",
    "format_table",
    "make_step",
    "run_cpu",
    "run_gpu",
    "seeded_model",
    "speed_ratios",
]
