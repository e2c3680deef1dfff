"""``seqvision resolution-sweep``: accuracy of one trained model at several input sizes.

Sequencer has no position embedding and no size-dependent layer, so a model trained at one size can be
run at another; the paper's resolution-adaptability figure plots top-1 against the test size (0.5x to 2x
the training size here) and compares with other architectures. Every size keeps the model's crop
fraction and interpolation; only the final input size changes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..commands.common import (
    add_model_args,
    format_table,
    image_size,
    open_data,
    output_dir,
    positive_float,
    report_skipped,
)
from ..data import LabelledImages
from ..errors import DataError, UserError
from ..evaluate import eval_data_config, eval_loader, eval_transform, evaluate, num_outputs, target_mapping
from ..files import write_csv, write_json
from ..images import MAX_IMG_SIZE
from ..inference import LoadedModel, load_any_model
from ..plots import new_figure, save_figure
from ..runtime import pick_device

DEFAULT_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


def sweep_sizes(train_size: int, scales: Sequence[float] = DEFAULT_SCALES, min_size: int = 1) -> list[int]:
    """Input sizes ``round(scale * train_size)``, without duplicates or sizes below ``min_size``."""
    sizes = sorted({max(int(round(s * train_size)), 1) for s in scales})
    return [s for s in sizes if s >= min_size]


def resolution_sweep(
    loaded: LoadedModel,
    data: LabelledImages,
    sizes: Sequence[int],
    device: torch.device,
    crop_pct: float | None = None,
    batch_size: int = 64,
    workers: int = 0,
    amp: bool = False,
    on_error: str = "skip",
    train_size: int | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per size: model, size, scale (relative to ``train_size``, by default the model's own input
    size), top-1, top-5, loss.

    A size the model cannot take (e.g. a fixed-size ViT) gives a row with NaN accuracy and the reason.
    """
    train_size = train_size or eval_data_config(loaded)["input_size"][-1]
    mapping, _ = target_mapping(data.class_names, loaded.class_names, num_outputs(loaded.model))
    rows, skipped = [], []
    for size in sizes:
        loader = eval_loader(
            data, eval_transform(eval_data_config(loaded, size, crop_pct)), mapping, batch_size, workers
        )
        row: dict[str, Any] = dict(model=loaded.name, size=size, scale=size / train_size)
        try:
            r = evaluate(loaded.model, loader, device, amp, on_error=on_error, source=data.source)
        except DataError:  # unreadable data fails at every size alike: stop, naming it
            raise
        except (RuntimeError, AssertionError, UserError) as e:
            # Models tied to one input size fail here; record why and go on with the other sizes.
            row.update(
                top1=float("nan"),
                top5=float("nan"),
                loss=float("nan"),
                images=0,
                error=str(e).splitlines()[0] if str(e) else type(e).__name__,
            )
            print(f"  {loaded.name} @ {size}: cannot evaluate ({row['error']})", file=sys.stderr)
        else:
            row.update(top1=r.top1, top5=r.top5, loss=r.loss, images=r.n)
            if not skipped:
                skipped = r.skipped  # the same files fail at every size: report them once
            print(f"  {loaded.name} @ {size}: top-1 {r.top1:.2f}%", file=sys.stderr)
        rows.append(row)
    return rows, skipped


def plot_sweep(rows: Sequence[dict[str, Any]], path: str | Path, train_sizes: dict[str, int] | None = None) -> Path:
    """Top-1 against input size, one line per model; dashed lines mark each model's own size."""
    fig = new_figure(6, 4)
    ax = fig.add_subplot()
    for name in dict.fromkeys(r["model"] for r in rows):
        pts = [(r["size"], r["top1"]) for r in rows if r["model"] == name]
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)[0]
        if train_sizes and name in train_sizes:
            ax.axvline(train_sizes[name], color=line.get_color(), linestyle="--", linewidth=0.8)
    ax.set_xlabel("test input size (px)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("resolution adaptability")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=(
            "Evaluate one checkpoint at several input sizes (default 0.5x to 2x its own size) and plot top-1 "
            "against size (the paper's resolution-adaptability figure); optionally sweep a timm model too "
            "at the same sizes for comparison. Writes resolution.csv, resolution.json and resolution.png."
        ),
        epilog=(
            "examples:\n"
            "  seqvision resolution-sweep --checkpoint runs/digits/best.pth --data-dir digits\n"
            "  seqvision resolution-sweep --model sequencer2d_s --pretrained --data-dir imagenet/val \\\n"
            "      --sizes 112 160 224 288 336 448 --compare resnet50 --compare-pretrained"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sizes", nargs="+", type=image_size, help="input sizes in pixels")
    g.add_argument(
        "--scales",
        nargs="+",
        type=positive_float,
        default=list(DEFAULT_SCALES),
        help="sizes as multiples of the model's own input size (default 0.5 ... 2.0)",
    )
    p.add_argument("--compare", help="a timm (or seqvision) model to sweep as well, e.g. resnet50")
    p.add_argument("--compare-checkpoint", help="weights of --compare")
    p.add_argument("--compare-pretrained", action="store_true", help="published weights of --compare")
    return p


def run(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    models = [load_any_model(args.model, args.checkpoint, device, args.pretrained)]
    if args.compare:
        models.append(_load_compare(args.compare, args.compare_checkpoint, device, args.compare_pretrained))
    data = open_data(args)
    rows, skipped, train_sizes = [], [], {}
    # Every model runs at the same absolute sizes (0.5x .. 2x the first model's size), as in the paper's figure.
    own = eval_data_config(models[0], args.img_size)["input_size"][-1]
    all_sizes = sorted(set(args.sizes)) if args.sizes else sweep_sizes(own, args.scales)
    if all_sizes[-1] > MAX_IMG_SIZE:
        raise UserError(f"--scales gives {all_sizes[-1]} px, above the largest input size ({MAX_IMG_SIZE} px)")
    for loaded in models:
        train_sizes[loaded.name] = own if loaded is models[0] else eval_data_config(loaded)["input_size"][-1]
        min_size = getattr(loaded.model, "min_input_size", 1)
        sizes = [s for s in all_sizes if s >= min_size]
        if not sizes:
            raise UserError(f"no size given is at least {min_size} px, the smallest {loaded.name} takes")
        r, s = resolution_sweep(
            loaded,
            data,
            sizes,
            device,
            args.crop_pct,
            args.batch_size,
            args.workers,
            args.amp,
            args.on_error,
            train_size=train_sizes[loaded.name],
        )
        rows += r
        skipped = skipped or s
    report_skipped(skipped)
    out = output_dir(args, "resolution-sweep")
    files = [
        write_json(
            out / "resolution.json", dict(data=data.source, train_sizes=train_sizes, rows=rows, skipped_images=skipped)
        ),
        write_csv(out / "resolution.csv", rows),
        plot_sweep(rows, out / "resolution.png", train_sizes),
    ]
    print(
        format_table(
            ["model", "size", "scale", "top-1 %", "top-5 %", "loss"],
            [[r["model"], r["size"], r["scale"], r["top1"], r["top5"], r["loss"]] for r in rows],
        )
    )
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def _load_compare(name: str, checkpoint: str | None, device: torch.device, pretrained: bool) -> LoadedModel:
    # A ViT-style timm model is tied to its input size unless built with dynamic_img_size.
    try:
        return load_any_model(name, checkpoint, device, pretrained, dynamic_img_size=True)
    except TypeError:
        return load_any_model(name, checkpoint, device, pretrained)
