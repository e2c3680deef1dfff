"""``seqvision demo``: train the built-in digits model, then read a few validation digits with the checkpoint
it wrote (rebuilt from the file alone, as ``seqvision predict`` would) and print them with the predictions."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from timm.data import create_transform

from ..data import digits_images, digits_split
from ..inference import load_model
from ..train import load_recipe, parse_set, resolve_config, train
from .common import non_negative_int, positive_int

SHADES = " .:-=+*#%@"  # ink 0..16 -> characters, darkest last


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seqvision demo",
        description="Train a small Sequencer2D on the built-in digits (seqvision train's default recipe), then "
        "predict a few validation digits with the checkpoint just written, showing predicted vs true.",
        epilog="examples:\n"
        "  seqvision demo                      # train (about a minute on 2 CPU cores), then predict\n"
        "  seqvision demo --skip-train         # predict again with runs/demo/best.pth\n"
        "  seqvision demo --epochs 5 --samples 20",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-o", "--output", default="runs/demo", help="run directory (default: runs/demo, replaced)")
    p.add_argument("--samples", type=non_negative_int, default=12, help="validation digits to show (default: 12)")
    p.add_argument("--epochs", type=positive_int, help="override the recipe's epochs")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any recipe key (repeatable)")
    p.add_argument("--skip-train", action="store_true", help="only predict, with the checkpoint in --output")
    return p


@torch.no_grad()
def predict_digits(checkpoint: str | Path, samples: int = 12) -> dict:
    """Predictions of the model in ``checkpoint`` for ``samples`` validation digits spread over the split,
    and its top-1 over the whole validation split."""
    loaded = load_model(checkpoint)
    transform = create_transform(**loaded.data_config, is_training=False)
    items = digits_images("val")
    x = torch.stack([transform(img.convert("RGB")) for img, _ in items])
    y = torch.tensor([t for _, t in items])
    probs = torch.cat([loaded.model(b).softmax(-1) for b in x.split(256)])
    conf, pred = probs.max(-1)
    pick = np.linspace(0, len(items) - 1, num=min(samples, len(items))).round().astype(int)
    raw, _ = digits_split("val")
    shown = [
        {
            "index": int(i),
            "true": loaded.class_names[int(y[i])],
            "pred": loaded.class_names[int(pred[i])],
            "confidence": float(conf[i]),
            "image": raw[i],
        }
        for i in pick
    ]
    return {"top1": 100 * float((pred == y).float().mean()), "n": len(items), "shown": shown}


def render(shown: list[dict], per_row: int = 6) -> str:
    """The 8x8 digits as text, side by side, each with its prediction."""
    lines = []
    for start in range(0, len(shown), per_row):
        row = shown[start : start + per_row]
        for r in range(8):
            lines.append("   ".join("".join(SHADES[min(int(v * 10 / 17), 9)] * 2 for v in s["image"][r]) for s in row))
        lines.append("   ".join(f"true {s['true']} pred {s['pred']}".ljust(16) for s in row))
        lines.append(
            "   ".join(
                (f"{100 * s['confidence']:.0f}%" + ("" if s["true"] == s["pred"] else " WRONG")).ljust(16) for s in row
            )
        )
        lines.append("")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    t0 = time.time()
    if not args.skip_train:
        overrides = {"output": str(out), **parse_set(args.set)}
        if args.epochs is not None:
            overrides["epochs"] = args.epochs
        train(resolve_config(load_recipe("digits"), overrides), "digits", overwrite=True)
    ckpt = out / "best.pth"
    result = predict_digits(ckpt, args.samples)
    print(f"\npredictions of {ckpt} on validation digits (8x8 scans, shown as text):\n")
    print(render(result["shown"]))
    right = sum(s["true"] == s["pred"] for s in result["shown"])
    print(
        f"{right}/{len(result['shown'])} shown digits right; top-1 on all {result['n']} validation digits: "
        f"{result['top1']:.2f}%  ({time.time() - t0:.0f} s in all)"
    )
    return 0
