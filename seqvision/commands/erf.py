"""``seqvision erf``: effective receptive fields (Luo et al., 2016), the paper's ERF figure."""

from __future__ import annotations

import argparse

import numpy as np

from ..analysis.erf import (
    LAYOUTS,
    default_layers,
    effective_receptive_field,
    erf_stats,
    log_maps,
    plot_erfs,
    shared_minmax,
)
from ..errors import DataError, UserError
from ..evaluate import eval_data_config, eval_loader, eval_transform, iterate_batches
from ..files import atomic_write, write_csv, write_json
from ..images import display_path
from ..inference import load_any_model
from ..runtime import pick_device
from .common import add_model_args, format_table, open_data, output_dir, report_skipped


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=(
            "Effective receptive field of chosen layers: the input gradient of the centre position, "
            "aggregated over images, log-scaled, as heat maps sharing one scale (one PNG per layer and one "
            "with all). For seqvision models and any timm model. Writes erf.json, erf.csv, erf.npz and PNGs."
        ),
        epilog=(
            "examples:\n"
            "  seqvision erf --checkpoint runs/digits/best.pth --data-dir digits\n"
            "  seqvision erf --model sequencer2d_s --pretrained --data-dir imagenet/val --layers stages.0 stages.3\n"
            "  seqvision erf --model resnet50 --pretrained --data-dir imagenet/val   # timm model for comparison"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p, max_images_help="images to aggregate over, evenly spaced (default 64)")
    p.add_argument("--layers", nargs="+", help="module names to probe (default: each stage's output)")
    p.add_argument("--layout", choices=LAYOUTS, default="auto", help="channel position of 4-D outputs")
    p.set_defaults(max_images=64)  # images to aggregate over
    return p


def run(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    loaded = load_any_model(args.model, args.checkpoint, device, args.pretrained)
    cfg = eval_data_config(loaded, args.img_size, args.crop_pct, args.interpolation)
    data = open_data(args)
    loader = eval_loader(data, eval_transform(cfg), batch_size=args.batch_size, workers=args.workers)
    skipped: list[str] = []
    read: list[int] = []  # batches that reached the model
    batches = (read.append(1) or x for x, _ in iterate_batches(loader, args.on_error, skipped))
    layers = args.layers or default_layers(loaded.model)
    try:
        raw, info = effective_receptive_field(loaded.model, batches, layers, args.layout, device, args.amp)
    except UserError:
        if read or not skipped:
            raise
        why = f"{len(skipped)} unreadable; the first: {skipped[0]}"
        raise DataError(f"no image in {display_path(data.source)} could be read ({why})") from None
    report_skipped(skipped)
    scaled = shared_minmax(log_maps(raw))
    rows = [dict(layer=n, **info[n], **erf_stats(raw[n], scaled[n])) for n in layers]
    out = output_dir(args, "erf")
    atomic_write(out / "erf.npz", lambda tmp: np.savez_compressed(tmp, **{n: raw[n] for n in layers}))
    files = [
        write_json(
            out / "erf.json",
            dict(
                model=loaded.name,
                data=data.source,
                input_size=cfg["input_size"][-1],
                images=len(data) - len(skipped),
                layers=rows,
                skipped_images=skipped,
            ),
        ),
        write_csv(
            out / "erf.csv",
            [
                {
                    **r,
                    "peak": tuple(r["peak"]),
                    "centre": tuple(r["centre"]),
                    "feature_shape": "x".join(map(str, r["feature_shape"])),
                }
                for r in rows
            ],
        ),
        out / "erf.npz",
        *plot_erfs({n: scaled[n] for n in layers}, out, loaded.name),
    ]
    print(f"{loaded.name}: ERF over {len(data) - len(skipped)} images at {cfg['input_size'][-1]} px")
    print(
        format_table(
            ["layer", "feature map", "centre", "peak (y, x)", "area >= 1% of peak"],
            [
                [
                    r["layer"],
                    "x".join(map(str, r["feature_shape"])),
                    tuple(r["centre"]),
                    tuple(r["peak"]),
                    f"{100 * r['area_1pct']:.1f}%",
                ]
                for r in rows
            ],
        )
    )
    print("wrote " + ", ".join(str(f) for f in files))
    return 0
