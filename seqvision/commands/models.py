"""``seqvision models``: every registered variant with its parameters, multiply-adds and feature maps."""

from __future__ import annotations

import argparse

from ..errors import UserError
from ..models import list_models
from ..models.complexity import variant_complexity
from .common import image_size, parser


def build_parser() -> argparse.ArgumentParser:
    p = parser(
        "seqvision models",
        "List the registered Sequencer variants.",
        ["seqvision models --flops", "seqvision models 'sequencer2d_s*'"],
    )
    p.add_argument("pattern", nargs="?", default="*", help="shell-style name filter (default: all)")
    p.add_argument("--flops", action="store_true", help="add GFLOPs (multiply-adds) with and without LSTMs")
    p.add_argument("--img-size", type=image_size, default=224, help="input size for the FLOPs and feature maps")
    return p


def models_table(pattern: str = "*", flops: bool = True, img_size: int = 224) -> str:
    """The markdown table printed by ``seqvision models`` (the README embeds ``--flops`` at 224)."""
    names = list_models(pattern)
    if not names:
        raise UserError(f"no model matches {pattern!r}; `seqvision models` lists them all")
    head = ["model", "params"]
    if flops:
        head += [f"GMACs @{img_size} (with LSTMs, paper)", "GMACs (without LSTMs)"]
    head += [f"feature maps @{img_size} (H x W x C per stage)"]
    rows = []
    for name in names:
        c = variant_complexity(name, img_size)
        row = [name, f"{c.params:,}"]
        if flops:
            row += [f"{c.macs / 1e9:.2f}", f"{c.macs_without_rnn / 1e9:.2f}"]
        row += [", ".join(f"{h}x{w}x{ch}" for h, w, ch in c.feature_shapes)]
        rows.append(row)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    print(models_table(args.pattern, args.flops, args.img_size))
    return 0
