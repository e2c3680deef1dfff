"""``seqvision convert``: a checkpoint from one format to another (authors', timm's, seqvision's)."""

from __future__ import annotations

import argparse

from ..checkpoint_meta import convert_checkpoint
from .common import parser


def build_parser() -> argparse.ArgumentParser:
    p = parser(
        "seqvision convert",
        "Convert a Sequencer checkpoint between formats. The source format (authors' .pth, timm's "
        ".safetensors/.pth, seqvision's .safetensors, or a seqvision training checkpoint) is detected.",
        [
            "seqvision convert sequencer2d_s.pth sequencer2d_s.safetensors",
            "seqvision convert model.safetensors authors.pth --to authors",
        ],
    )
    p.add_argument("src", help="checkpoint to read")
    p.add_argument("dst", help="file to write (.safetensors or .pth)")
    p.add_argument("--to", choices=("seqvision", "timm", "authors"), default="seqvision", help="output format")
    return p


def run(args: argparse.Namespace) -> int:
    r = convert_checkpoint(args.src, args.dst, args.to)
    variant = r["variant"] or "unrecognised variant"
    print(f"{args.src} ({r['from']} layout, {variant}, {r['tensors']} tensors) -> {args.dst} ({r['to']})")
    return 0
