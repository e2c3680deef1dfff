"""Training step or inference (CPU) with every row in a fresh process: peak memory, time, page faults; seqvision
vs timm.

`seqvision bench` runs its rows in one process, interleaved, which is right for comparing speed under the same
machine load but hides what the memory allocator does: one row's freed blocks are reused by the next, and its
RSS column cannot see what another row left behind. Here every row runs alone, as a user's training run would:
build the model, run warm-up steps (they allocate the optimiser state), reset the kernel's high-water mark
(/proc/self/clear_refs), then time `--steps` training steps (forward + backward + AdamW; with `--inference`, batched
forward passes in inference mode) and read VmHWM (the peak resident memory of a steady-state step), the minor
page faults and the kernel (system) CPU time per step. "Process peak above the built model" is the highest RSS
the process ever reached, warm-up included, minus its RSS once the model and input existed: all the memory
running the model cost, including what the allocator kept between steps.
`--rounds` repeats the set of processes, one row after another, so slow spells of a shared machine hit every
row; times are the fastest and the median step over all rounds.

Page faults matter on the CPU: glibc's malloc hands large blocks (activations, their gradients) back to the
kernel when they are freed and takes fresh, zero-filled pages for the next step. `--tuned-malloc` runs the
processes with glibc's `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647` (freed memory stays in the process
and is reused), to show how much of a row's time is that.

    python benchmarks/bench_memory.py                          # sequencer2d_s, batch 8, 224 px
    python benchmarks/bench_memory.py --model sequencer2d_m --batch 16 --rounds 3 --tuned-malloc
    python benchmarks/bench_memory.py --inference --batch 32 --rounds 2

Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

from seqvision.commands.common import non_negative_int, positive_int

ROWS = ("seqvision fused", "seqvision reference", "timm")
TUNED_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "2147483647"}


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(
    row: str, model_name: str, batch: int, img_size: int, steps: int, warmup: int = 2, train: bool = True
) -> dict[str, float | list[float]]:
    """One row, in this process: peak RSS during the timed steps and RSS before them (MiB), each timed step's
    seconds, and minor page faults and system CPU seconds per step (training steps, or inference passes)."""
    import resource
    import time

    from seqvision.bench import make_step

    if row == "timm":
        import timm

        model, engine = timm.create_model(model_name), None
    else:
        from seqvision import create_model

        model, engine = create_model(model_name), row.split()[-1]
    # The step `seqvision bench` times: fp32 inference, or (--train) forward, cross-entropy, backward, AdamW.
    step = make_step(model, batch, img_size, "fp32", "fp32", train, engine)
    built = _status_mib("VmRSS")
    _reset_peak()  # the peaks of building the model are not the steps'
    for _ in range(max(1, warmup)):
        step()
    warmup_peak = _status_mib("VmHWM")
    before = _status_mib("VmRSS")
    _reset_peak()
    times = []
    usage = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "peak": _status_mib("VmHWM"),
        "before": before,
        "growth": max(warmup_peak, _status_mib("VmHWM")) - built,
        "times": times,
        "faults": (after.ru_minflt - usage.ru_minflt) / steps,
        "sys": (after.ru_stime - usage.ru_stime) / steps,
    }


def _row_in_fresh_process(row: str, args: argparse.Namespace) -> dict[str, float | list[float]]:
    cmd = [sys.executable, os.path.abspath(__file__), "--row", row, "--model", args.model, "--batch", str(args.batch)]
    cmd += ["--img-size", str(args.img_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--inference"] if args.inference else []
    env = {**os.environ, **(TUNED_MALLOC if args.tuned_malloc else {})}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    values = out.stdout.split()[-(5 + args.steps) :]  # peak before growth faults sys step-times...
    peak, before, growth, faults, sys_s, *times = (float(v) for v in values)
    return {"peak": peak, "before": before, "growth": growth, "faults": faults, "sys": sys_s, "times": times}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="example: python benchmarks/bench_memory.py --model sequencer2d_s --batch 8 --rounds 2 --tuned-malloc",
    )
    p.add_argument("--model", default="sequencer2d_s")
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--img-size", type=positive_int, default=224)
    p.add_argument("--steps", type=positive_int, default=2, help="timed steps per process (default: 2)")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps first (default: 2)")
    p.add_argument(
        "--rounds", type=positive_int, default=1, help="fresh processes per row, rows taking turns (default: 1)"
    )
    p.add_argument("--tuned-malloc", action="store_true", help=f"run the rows with {' '.join(TUNED_MALLOC)} set")
    p.add_argument("--inference", action="store_true", help="time inference (forward passes) instead of training")
    p.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)  # internal: measure one row and print it
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.row:
        r = measure(args.row, args.model, args.batch, args.img_size, args.steps, args.warmup, not args.inference)
        print(
            f"{r['peak']:.1f} {r['before']:.1f} {r['growth']:.1f} {r['faults']:.0f} {r['sys']:.4f} "
            + " ".join(map(str, r["times"]))
        )
        return 0
    import timm
    import torch

    rows = [row for row in ROWS if row != "timm" or timm.is_model(args.model)]
    base = "timm" if "timm" in rows else "seqvision reference"
    malloc = "glibc malloc tuned (" + " ".join(f"{k}={v}" for k, v in TUNED_MALLOC.items()) + ")"
    print(
        f"{args.model}, {args.img_size} px, batch {args.batch}, "
        f"{'inference' if args.inference else 'training step (fwd + bwd + AdamW)'}, fp32, CPU, "
        f"{torch.get_num_threads()} threads, each row in a fresh process ({args.rounds} x {args.steps} timed steps), "
        f"{malloc if args.tuned_malloc else 'default glibc malloc'}\n"
    )
    if base != "timm":  # the GRU / tanh-RNN variants
        print(f"note: timm has no {args.model}; the ratios are to seqvision's reference engine\n")
    results: dict[str, list[dict]] = {row: [] for row in rows}
    for _ in range(args.rounds):
        for row in rows:
            results[row].append(_row_in_fresh_process(row, args))
    print(
        f"| implementation | fastest step (ms) | median step (ms) | speed vs {base} (fastest / median) | "
        f"peak RSS during a step (MiB) | RSS before (MiB) | peak / {base} | process peak above the built model "
        f"(MiB) | that / {base} | minor page faults per step | system CPU s per step |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    summary = {}
    for row, runs in results.items():
        times = [t for r in runs for t in r["times"]]
        summary[row] = {
            "fast": min(times),
            "median": statistics.median(times),
            "peak": max(r["peak"] for r in runs),
            "before": max(r["before"] for r in runs),
            "growth": max(r["growth"] for r in runs),
            "faults": statistics.median(r["faults"] for r in runs),
            "sys": statistics.median(r["sys"] for r in runs),
        }
    ref = summary[base]
    for row, s in summary.items():
        print(
            f"| {row} | {1e3 * s['fast']:.0f} | {1e3 * s['median']:.0f} | "
            f"{ref['fast'] / s['fast']:.2f}x / {ref['median'] / s['median']:.2f}x | {s['peak']:.0f} | "
            f"{s['before']:.0f} | {s['peak'] / ref['peak']:.2f}x | {s['growth']:.0f} | "
            f"{s['growth'] / ref['growth']:.2f}x | {s['faults']:.0f} | {s['sys']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
