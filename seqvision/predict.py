"""``seqvision predict``: classify image files with a trained model."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path

import torch
from timm.data import create_transform

from .commands.common import positive_int
from .errors import UserError
from .images import display_path, open_image
from .inference import LoadedModel, load_model, quantize_dynamic

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def expand_inputs(items: list[str]) -> tuple[list[Path], list[str]]:
    """Files, directories (searched recursively for images) and glob patterns -> (image paths, problems)."""
    paths, problems = [], []
    for item in items:
        try:
            found, problem = _expand(item)
        except OSError as e:  # e.g. a directory that cannot be listed
            found, problem = [], f"{display_path(item)}: cannot read ({e.strerror or type(e).__name__})"
        paths += found
        if problem:
            problems.append(problem)
    return paths, problems


def _expand(item: str) -> tuple[list[Path], str | None]:
    p = Path(item)
    if p.is_dir():
        found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        return found, None if found else f"{display_path(item)}: no images in this directory"
    if p.exists() or p.is_symlink():  # a dangling link is reported by open_image, by path
        return [p], None
    if any(ch in item for ch in "*?["):
        found = sorted(Path(f) for f in glob.glob(item, recursive=True) if os.path.isfile(f))
        return found, None if found else f"{display_path(item)}: the pattern matches no file"
    return [], f"{display_path(item)}: no such file"


@torch.no_grad()
def predict(
    loaded: LoadedModel, paths: list[Path], topk: int = 5, batch_size: int = 32
) -> tuple[list[dict], list[str]]:
    """Top-k predictions for each readable image; unreadable files are returned as problems."""
    transform = create_transform(**loaded.data_config)
    device = next(loaded.model.parameters()).device
    k = min(topk, len(loaded.class_names))
    results, problems = [], []
    batch: list[tuple[Path, torch.Tensor]] = []

    def flush() -> None:
        if not batch:
            return
        x = torch.stack([t for _, t in batch]).to(device)
        probs = loaded.model(x).float().softmax(-1)
        values, indices = probs.topk(k, dim=-1)
        for (path, _), v, i in zip(batch, values.tolist(), indices.tolist(), strict=True):
            preds = [
                {"class": loaded.class_names[c], "index": c, "prob": round(p, 6)} for p, c in zip(v, i, strict=True)
            ]
            results.append({"path": os.fsdecode(path), "predictions": preds})
        batch.clear()

    for path in paths:
        try:
            batch.append((path, transform(open_image(path))))
        except UserError as e:
            problems.append(str(e))
        if len(batch) == batch_size:
            flush()
    flush()
    return results, problems


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=(
            "Classify images with a trained Sequencer. Preprocessing comes from the checkpoint (or the model's "
            "pretrained_cfg); class names from the checkpoint, ImageNet-1k's for 1000-class models, else 0..N-1."
        ),
        epilog=(
            "examples:\n"
            "  seqvision predict digit.png --checkpoint runs/digits/best.pth\n"
            "  seqvision predict photos/ 'more/*.jpg' --model sequencer2d_s --checkpoint sequencer2d_s.pth --json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="+", help="image files, directories or glob patterns")
    p.add_argument("--checkpoint", help="weights: a seqvision training checkpoint, or authors'/timm's/seqvision's file")
    p.add_argument("--model", help="variant name (needed only when the checkpoint does not say)")
    p.add_argument("--pretrained", action="store_true", help="use the published weights of --model")
    p.add_argument("--topk", type=positive_int, default=5, help="how many classes to show per image (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, mps ...")
    p.add_argument("--quantize", choices=("dynamic",), help="int8 dynamic quantisation of LSTM/Linear weights (CPU)")
    return p


def run(args: argparse.Namespace) -> int:
    paths, problems = expand_inputs(args.images)
    loaded = load_model(args.checkpoint, args.model, args.device, pretrained=args.pretrained)
    if args.quantize:
        loaded.model = quantize_dynamic(loaded.model)
    results, unreadable = predict(loaded, paths, args.topk, args.batch_size)
    problems += unreadable
    if not results and len(problems) == 1:  # one input, one reason: the error line says it
        raise UserError(f"no image could be predicted: {problems[0]}")
    for line in problems:
        print(f"skipped {line}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            top = ", ".join(f"{p['class']} {p['prob']:.1%}" for p in r["predictions"])
            print(f"{display_path(r['path'])}: {top}")
    if not results:
        inputs = ", ".join(display_path(i) for i in args.images[:3]) + (", ..." if len(args.images) > 3 else "")
        skipped = f" ({len(problems)} skipped)" if problems else ""
        raise UserError(f"no image could be predicted from {inputs}{skipped}")
    return 0
