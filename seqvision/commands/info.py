"""``seqvision info``: one variant in detail: parameters, multiply-adds, stages, feature maps, preprocessing."""

from __future__ import annotations

import argparse

from ..models import model_config, resolve_name
from ..models.complexity import variant_complexity
from ..models.sequencer import pretrained_cfg_for
from .common import image_size, parser


def build_parser() -> argparse.ArgumentParser:
    p = parser(
        "seqvision info",
        "Summarise one model: parameters, multiply-adds, feature shapes and preprocessing.",
        ["seqvision info sequencer2d_s --img-size 392"],
    )
    p.add_argument("model", nargs="?", default="sequencer2d_s", help="variant name (default: sequencer2d_s)")
    p.add_argument("--img-size", type=image_size, default=None, help="input size (default: the variant's own)")
    return p


def model_summary(name: str, img_size: int | None = None) -> str:
    """A human-readable summary of a registered variant."""
    name = resolve_name(name)
    cfg = pretrained_cfg_for(name)
    size = img_size or cfg["input_size"][-1]
    c = variant_complexity(name, size)
    arch = model_config(name)
    lines = [
        f"{name}",
        f"  parameters            {c.params:,}",
        f"  multiply-adds @{size}   {c.macs / 1e9:.2f} G with LSTMs (paper's convention), "
        f"{c.macs_without_rnn / 1e9:.2f} G without",
        f"  stages                layers {tuple(arch['layers'])}, widths {tuple(arch['embed_dims'])}, "
        f"hidden {tuple(arch['hidden_sizes'])}",
        "  feature maps          " + "  ".join(f"{h}x{w}x{ch}" for h, w, ch in c.feature_shapes),
        f"  preprocessing         {cfg['input_size'][-1]} px, crop_pct {cfg['crop_pct']}, "
        f"{cfg['interpolation']}, mean {cfg['mean']}, std {cfg['std']}",
        f"  published weights     {cfg['url'] or 'none'}",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    print(model_summary(args.model, args.img_size))
    return 0
