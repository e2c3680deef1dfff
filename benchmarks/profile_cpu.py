"""Where a CPU forward of seqvision's Sequencer2D goes, by op class, in fp32 and both bf16 modes (one process).

torch.profiler over ``--steps`` inference forwards per mode (after one warm-up), the fused engine, CPU self time
summed into classes: the fused RNN op, Linear GEMMs, LayerNorm, GELU, residual adds, convs, dtype casts,
layout copies (permute/contiguous), and the rest. Under bf16 autocast the cast rows show the dtype round trips
(calls and MB per forward; copy_ also carries each Linear's bias copy into its output). A class's share is of the
profiled self time, not of wall time.

    python benchmarks/profile_cpu.py --batch 8 --threads 2
    python benchmarks/profile_cpu.py --batch 8 --modes autocast --bf16-recurrence
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seqvision import ops  # noqa: E402
from seqvision.bench import seeded_model  # noqa: E402
from seqvision.ops import fused  # noqa: E402

# Op-name fragments -> class, first match wins. In inference the Linears run addmm; aten::mm is the fused op's
# one input-projection GEMM per block (its own self time is the recurrences).
CLASSES = [
    ("fused RNN op: recurrences", ("seqvision::rnn2d", "rnn2d_forward", "mkldnn_rnn", "lstm")),
    ("fused RNN op: input projections (aten::mm)", ("aten::mm",)),
    ("Linear GEMMs (addmm)", ("addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("LayerNorm", ("layer_norm",)),
    ("GELU", ("gelu",)),
    ("convs", ("conv", "mkldnn_convolution")),
    ("casts and copies", ("aten::to", "_to_copy", "aten::copy_")),
    ("layout copies, cat / stack", ("contiguous", "clone", "permute", "transpose", "aten::cat", "aten::stack")),
    ("residual adds", ("aten::add",)),
    ("mean / head", ("aten::mean",)),
]


def classify(name: str) -> str:
    return next((cls for cls, keys in CLASSES if any(k in name for k in keys)), "other")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sequencer2d_s")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=2, help="profiled forwards per mode (default 2)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--modes", default="fp32,autocast,bf16 weights", help="comma-separated (default: all three)")
    p.add_argument("--bf16-recurrence", action="store_true", help="bf16 recurrent products in the fused op")
    p.add_argument("--top", type=int, default=0, help="also list each mode's N ops with the most self time")
    return p


def profile_mode(
    model, x, mode: str, steps: int, top: int = 0
) -> tuple[dict[str, float], dict[str, tuple[int, float]]]:
    """ms per forward by class, and per cast op name (calls per forward, MB of input converted per forward); prints
    the ``top`` ops by self time."""
    from torch.profiler import ProfilerActivity, profile

    amp = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()
    with torch.inference_mode(), ops.use_engine("fused"), amp:
        model(x)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(steps):
                model(x)
    if top:
        print(f"\n{mode}: top {top} ops by self CPU time ({steps} forwards)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40))
    by_class: dict[str, float] = defaultdict(float)
    casts: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in prof.key_averages(group_by_input_shape=True):
        by_class[classify(e.key)] += e.self_cpu_time_total / 1e3 / steps
        if classify(e.key) == "casts and copies" and e.input_shapes and e.input_shapes[0]:
            numel = 1
            for d in e.input_shapes[0]:
                numel *= d
            casts[e.key][0] += e.count / steps
            casts[e.key][1] += e.count * numel * 4 / 1e6 / steps  # upper bound: 4 bytes an element
    return dict(by_class), {k: (int(v[0]), v[1]) for k, v in casts.items()}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fused.set_bf16_recurrence(args.bf16_recurrence)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"{args.model}, {args.img_size} px, batch {args.batch}, {torch.get_num_threads()} threads, CPU: {cpu}")
    print(f"bf16 recurrence: {fused.bf16_recurrence()} ({fused.bf16_recurrence_kernel()} kernel)")
    results = {}
    for mode in [m.strip() for m in args.modes.split(",")]:
        model = seeded_model(args.model).eval()
        x = torch.randn(args.batch, 3, args.img_size, args.img_size)
        if mode == "bf16 weights":
            model, x = model.bfloat16(), x.bfloat16()
        results[mode] = profile_mode(model, x, mode, args.steps, args.top)
    modes = list(results)
    print("\n| op class | " + " | ".join(f"{m}: ms / forward (share)" for m in modes) + " |")
    print("|---|" + "---|" * len(modes))
    classes = [c for c, _ in CLASSES] + ["other"]
    totals = {m: sum(results[m][0].values()) for m in modes}
    for cls in classes:
        ms = {m: results[m][0].get(cls, 0.0) for m in modes}
        cells = [f"{ms[m]:.1f} ({100 * ms[m] / totals[m]:.0f}%)" for m in modes]
        print(f"| {cls} | " + " | ".join(cells) + " |")
    print("| total profiled self time | " + " | ".join(f"{totals[m]:.1f}" for m in modes) + " |")
    for m in modes:
        casts = results[m][1]
        if casts:
            summary = ", ".join(f"{k} {n} calls ({mb:.0f} MB)" for k, (n, mb) in sorted(casts.items()))
            print(f"\n{m}: casts and copies per forward: {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
