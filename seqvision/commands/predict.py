"""``seqvision predict``: classify image files with a trained model."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import UserError
from ..images import display_path
from ..inference import load_model, quantize_dynamic
from ..predict import expand_inputs, predict
from .common import positive_int


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
