"""``seqvision resolution-sweep``: accuracy of one trained model at several input sizes."""

from __future__ import annotations

import argparse

import torch

from ..analysis.resolution import DEFAULT_SCALES, plot_sweep, resolution_sweep, sweep_sizes
from ..errors import UserError
from ..evaluate import eval_data_config
from ..files import write_csv, write_json
from ..images import MAX_IMG_SIZE
from ..inference import LoadedModel, load_any_model
from ..runtime import pick_device
from .common import (
    add_model_args,
    format_table,
    image_size,
    open_data,
    output_dir,
    positive_float,
    report_skipped,
)


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
