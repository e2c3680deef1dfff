"""Peak memory of one training step (CPU): seqvision's engines against timm, each in a fresh process.

The RSS column of `seqvision bench` is measured in one process, row after row, so what one row frees and the
allocator keeps is invisible to the next. Here every row runs alone: build the model, run one training step
(forward + backward + AdamW) to allocate the optimiser state, reset the kernel's high-water mark
(/proc/self/clear_refs), run a second step, and read VmHWM: the peak resident memory of a steady-state step.

    python benchmarks/bench_memory.py                          # sequencer2d_s, batch 8, 224 px
    python benchmarks/bench_memory.py --model sequencer2d_m --batch 16

Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

ROWS = ("seqvision fused", "seqvision reference", "timm")


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def measure(row: str, model_name: str, batch: int, img_size: int) -> tuple[float, float]:
    """(peak RSS during a training step, RSS before it) in MiB, for one row, in this process."""
    import torch
    from torch import nn

    if row == "timm":
        import timm

        model = timm.create_model(model_name)
    else:
        from seqvision import create_model, ops

        model = create_model(model_name)
        ops.set_engine(row.split()[-1])
    x = torch.randn(batch, 3, img_size, img_size)
    y = torch.randint(0, 1000, (batch,))
    opt = torch.optim.AdamW(model.parameters())

    def step() -> None:
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    before = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    step()
    return _status_mib("VmHWM"), before


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="example: python benchmarks/bench_memory.py --model sequencer2d_s --batch 8",
    )
    p.add_argument("--model", default="sequencer2d_s")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)  # internal: measure one row and print it
    args = p.parse_args(argv)
    if args.row:
        peak, before = measure(args.row, args.model, args.batch, args.img_size)
        print(f"{peak:.0f} {before:.0f}")
        return 0
    print(f"{args.model}, {args.img_size} px, batch {args.batch}, training step (fwd + bwd + AdamW), fp32, CPU\n")
    print("| implementation | peak RSS during a step (MiB) | RSS before the step (MiB) | peak / timm |")
    print("|---|---|---|---|")
    results = {}
    for row in ROWS:
        cmd = [sys.executable, __file__, "--row", row, "--model", args.model, "--batch", str(args.batch)]
        out = subprocess.run([*cmd, "--img-size", str(args.img_size)], capture_output=True, text=True, check=True)
        results[row] = tuple(float(v) for v in out.stdout.split()[-2:])
    for row, (peak, before) in results.items():
        print(f"| {row} | {peak:.0f} | {before:.0f} | {peak / results['timm'][0]:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
