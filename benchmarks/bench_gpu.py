"""GPU throughput of seqvision's Sequencer2D (Triton engine) against timm's sequencer2d_s/m/l and convnext_tiny.

    python benchmarks/bench_gpu.py                      # every model, AMP bf16, batch 256, inference and training
    python benchmarks/bench_gpu.py --modes infer --models seqvision:sequencer2d_s timm:sequencer2d_s

Thin wrapper around ``seqvision.benchmark_gpu`` (also ``seqvision bench --device cuda``); see --help.
"""

from __future__ import annotations

from seqvision.benchmark_gpu import main

if __name__ == "__main__":
    raise SystemExit(main())
