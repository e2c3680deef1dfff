"""What the subcommands share: argument types that reject bad numbers in one line, the options of every
evaluation command, where results go, and how tables and skipped images are printed."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ..data import BUILTIN_SETS, DATASETS, LabelledImages, open_dataset
from ..errors import DataError
from ..evaluate import ON_ERROR
from ..images import CROP_PCT_RANGE, MAX_IMG_SIZE


# argparse turns an ArgumentTypeError into one line ("seqvision bench: error: argument --batch: must be ...")
# instead of the traceback a 0 or a negative count would raise deep inside torch or the data loader.
def _number(text: str, kind: type, ok: Callable[[Any], bool], what: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or value != value or not ok(value):  # value != value: NaN
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (batch sizes, counts)."""
    return _number(text, int, lambda v: v >= 1, "an integer of at least 1")


def non_negative_int(text: str) -> int:
    """argparse type: an integer of 0 or more (worker processes, warm-up steps)."""
    return _number(text, int, lambda v: v >= 0, "an integer of 0 or more")


def image_size(text: str) -> int:
    """argparse type: an input size in pixels, 1 to ``MAX_IMG_SIZE``."""
    return _number(text, int, lambda v: 1 <= v <= MAX_IMG_SIZE, f"a size in pixels from 1 to {MAX_IMG_SIZE}")


def crop_fraction(text: str) -> float:
    """argparse type: a centre-crop fraction in ``CROP_PCT_RANGE``."""
    lo, hi = CROP_PCT_RANGE
    return _number(text, float, lambda v: lo <= v <= hi, f"a crop fraction from {lo:g} to {hi:g}")


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0 (step sizes, crop fractions)."""
    return _number(text, float, lambda v: 0 < v < math.inf, "a number above 0")


def non_negative_float(text: str) -> float:
    """argparse type: a finite number of 0 or more (attack radii)."""
    return _number(text, float, lambda v: 0 <= v < math.inf, "a number of 0 or more")


def positive_int_list(text: str) -> list[int]:
    """argparse type: comma-separated integers of at least 1, e.g. ``1,8,32``."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        values = [positive_int(p) for p in parts]
    except argparse.ArgumentTypeError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers of at least 1 (e.g. 1,8,32), got {text!r}")
    return values


def parser(prog: str, description: str, examples: Sequence[str]) -> argparse.ArgumentParser:
    """A subcommand's parser, its examples shown under ``--help``."""
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="example" + ("s" if len(examples) > 1 else "") + ":\n" + "\n".join(f"  {e}" for e in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


# -- evaluation commands ----------------------------------------------------------------------------------
def add_model_args(
    p: argparse.ArgumentParser,
    data: bool = True,
    max_images_help: str = "use only N evenly spaced images",
    named_sets: bool = True,
) -> None:
    """The options every evaluation command shares (``named_sets``: --dataset, for commands that read more than
    ImageFolder trees)."""
    p.add_argument("--model", help="variant name, or any timm model name (needed when the checkpoint does not say)")
    p.add_argument("--checkpoint", help="weights: a seqvision training checkpoint, or authors'/timm's/seqvision's file")
    p.add_argument("--pretrained", action="store_true", help="use the published weights of --model")
    if data:
        p.add_argument(
            "--data-dir",
            help="an ImageFolder tree (<dir>/<class>/<image>), a torchvision set's folder "
            "(with --dataset), or 'digits'",
        )
        if named_sets:
            p.add_argument(
                "--dataset",
                choices=DATASETS,
                help="what --data-dir holds (default: folder, or the built-in set it names)",
            )
        p.add_argument("--split", help="sub-directory of an ImageFolder tree (e.g. val); train or val otherwise")
    p.add_argument("--img-size", type=image_size, help="input size (default: the model's preprocessing)")
    p.add_argument("--crop-pct", type=crop_fraction, help="centre-crop fraction (default: the model's preprocessing)")
    p.add_argument("--interpolation", choices=("bilinear", "bicubic", "nearest"), help="resize interpolation")
    if data:
        p.add_argument("--max-images", type=positive_int, help=max_images_help)
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch (default 64)")
    p.add_argument(
        "--workers", type=non_negative_int, default=2, help="data-loading processes (default 2; 0 loads in-process)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
    p.add_argument(
        "--on-error",
        choices=ON_ERROR,
        default="skip",
        help="unreadable images: skip them and report their paths (default), or stop",
    )
    p.add_argument("--output-dir", default=None, help="where to write JSON/CSV/PNG (default: ./results/<command>)")


def open_data(args: argparse.Namespace) -> LabelledImages:
    """The data an evaluation command's ``--dataset`` / ``--data-dir`` / ``--split`` / ``--max-images`` name."""
    name, data_dir = getattr(args, "dataset", None), args.data_dir
    if name is None and data_dir in BUILTIN_SETS:
        name, data_dir = data_dir, None
    if name is None:
        name = "folder"
    if data_dir is None and name not in BUILTIN_SETS:
        raise DataError(f"--data-dir is needed for {name} data")
    split = args.split if args.split or name == "folder" else "val"
    return open_dataset(name, split, data_dir).subsample(getattr(args, "max_images", None))


def output_dir(args: argparse.Namespace, command: str) -> Path:
    """``--output-dir``, or ``results/<command>``."""
    return Path(args.output_dir or Path("results") / command)


def format_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table; floats with two decimals."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def report_skipped(skipped: Sequence[str], limit: int = 20) -> None:
    """Print unreadable images to stderr, by path (the first ``limit``, then a count)."""
    for line in skipped[:limit]:
        print(f"skipped {line}", file=sys.stderr)
    if len(skipped) > limit:
        print(f"... and {len(skipped) - limit} more unreadable images", file=sys.stderr)
    if skipped:
        print(f"{len(skipped)} unreadable image(s) skipped", file=sys.stderr)
