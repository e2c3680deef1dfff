"""Same-run A/B of the fused CPU engine: this checkout's kernels against another git revision's, in one process.

The other revision's ``seqvision/ops/csrc/rnn2d.cpp`` is built under its own extension name; each round runs one
forward of the model with each build (the order alternating between rounds), and the report gives the ratio of
the fastest rounds and the median of the per-round ratios with its quartiles (a load change between rounds
cancels out of a round's ratio). Everything but the kernels (model, weights, input, Python code) is shared.

    python benchmarks/ab_fused_build.py --ref HEAD~3 --batch 1,8 --rounds 10
    python benchmarks/ab_fused_build.py --ref main --batch 8 --amp       # bf16 autocast
    SEQVISION_BF16_RECURRENCE=1 python benchmarks/ab_fused_build.py --ref main --amp
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from seqvision import ops  # noqa: E402
from seqvision.models import create_model  # noqa: E402
from seqvision.ops import fused  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", required=True, help="git revision whose rnn2d.cpp is the baseline (e.g. HEAD~1, main)")
    p.add_argument("--model", default="sequencer2d_s")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=10, help="timed rounds per batch size (default 10)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast instead of fp32")
    return p


class _OldKernels:
    """Another revision's kernels behind this revision's calling convention (arguments it lacks are dropped:
    they select options that revision does not have, such as the bf16 recurrence)."""

    def __init__(self, ops_namespace):
        self._ops = ops_namespace

    def rnn2d_forward(self, *args):
        return self._ops.rnn2d_forward(*args[:9])

    def rnn2d_backward(self, *args):
        return self._ops.rnn2d_backward(*args[:10])

    def __getattr__(self, name):
        return getattr(self._ops, name)


def build_revision(ref: str):
    """Compile ``ref``'s rnn2d.cpp under an extension name of its own; returns its kernels."""
    from torch.utils import cpp_extension

    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, check=True, capture_output=True, text=True)
    sha = sha.stdout.strip()
    source = subprocess.run(
        ["git", "show", f"{sha}:seqvision/ops/csrc/rnn2d.cpp"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    name = f"seqvision_fused_ab_{sha}"
    src = Path(tempfile.mkdtemp()) / "rnn2d.cpp"
    src.write_text(source)
    cflags = fused._CFLAGS
    cpp_extension.load(
        name=name,
        sources=[str(src)],
        extra_cflags=cflags,
        extra_ldflags=[f for f in cflags if f in fused._OPENMP],
        is_python_module=False,
    )
    return sha, _OldKernels(getattr(torch.ops, name))


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    assert fused.available(), fused.load_error()
    new = fused._ext
    sha, old = build_revision(args.ref)
    builds = {"this checkout": new, args.ref if sha.startswith(args.ref) else f"{args.ref} ({sha})": old}
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    mode = "bf16 autocast" if args.amp else "fp32"
    extra = f", bf16 recurrence {fused.bf16_recurrence()}" if args.amp else ""
    print(f"{args.model}, {args.img_size} px, inference, {mode}{extra}, {torch.get_num_threads()} threads; CPU: {cpu}")
    model = create_model(args.model).eval()
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp)
    for batch in [int(b) for b in args.batch.split(",")]:
        x = torch.randn(batch, 3, args.img_size, args.img_size)
        times: dict[str, list[float]] = {k: [] for k in builds}
        outputs = {}
        with torch.inference_mode(), ops.use_engine("fused"), amp:
            for k, ext in builds.items():  # warm-up, and the outputs to compare
                fused._ext = ext
                outputs[k] = model(x).float()
                model(x)
            for i in range(args.rounds):
                order = list(builds) if i % 2 == 0 else list(reversed(builds))
                for k in order:
                    fused._ext = builds[k]
                    t = time.perf_counter()
                    model(x)
                    times[k].append(time.perf_counter() - t)
        fused._ext = new
        a, b = builds
        diff = (outputs[a] - outputs[b]).abs().max().item()
        per_round = [tb / ta for ta, tb in zip(times[a], times[b], strict=True)]
        q1, med, q3 = quartiles(per_round)
        fastest = min(times[b]) / min(times[a])
        print(
            f"batch {batch}: {a} {1e3 * min(times[a]) / batch:.1f} ms/img (fastest of {args.rounds}), "
            f"{b} {1e3 * min(times[b]) / batch:.1f}; {a} vs {b}: fastest {fastest:.3f}x, per-round median "
            f"{med:.3f}x ({q1:.3f}-{q3:.3f}); max |logit difference| {diff:.1e}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
