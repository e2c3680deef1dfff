"""CPU throughput of seqvision's Sequencer2D (fused / reference engines) against timm, one markdown table.

    python benchmarks/bench_cpu.py --model sequencer2d_s --batch 1,8,32 --dtype fp32,bf16
    python benchmarks/bench_cpu.py --batch 8 --train

The same as ``seqvision bench``; see --help.
"""

from __future__ import annotations

import sys

from seqvision.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
