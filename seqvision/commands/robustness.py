"""``seqvision robustness``: accuracy under distribution shift."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..analysis.robustness import (
    BENCHMARKS,
    CORRUPTIONS,
    SEVERITIES,
    Runner,
    imagenet_c,
)
from ..data import image_folder
from ..errors import DataError
from ..evaluate import (
    eval_data_config,
)
from ..files import write_csv, write_json
from ..inference import load_any_model
from ..runtime import pick_device
from .common import add_model_args, format_table, output_dir, report_skipped


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=(
            "Robustness benchmarks: ImageNet-C (CE per corruption against AlexNet and mCE), ImageNet-A and "
            "ImageNet-R (200-class subsets scored on their 200 logits), ImageNet-Sketch, or any ImageFolder "
            "tree. Results are printed and written as JSON and CSV."
        ),
        epilog=(
            "examples:\n"
            "  seqvision robustness imagenet-c --model sequencer2d_l --pretrained --data-dir imagenet-c/\n"
            "  seqvision robustness imagenet-a --model sequencer2d_l --pretrained --data-dir imagenet-a/\n"
            "  seqvision robustness folder --checkpoint runs/digits/best.pth --data-dir noisy_digits/"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("benchmark", choices=BENCHMARKS, help="which layout / protocol the data follows")
    add_model_args(p, named_sets=False)
    p.add_argument(
        "--corruptions",
        nargs="+",
        choices=CORRUPTIONS,
        default=list(CORRUPTIONS),
        help="ImageNet-C corruptions to run (default: all 15; mCE is comparable only with all)",
    )
    p.add_argument("--severities", nargs="+", type=int, choices=SEVERITIES, default=list(SEVERITIES))
    return p


def run(args: argparse.Namespace) -> int:
    if args.data_dir is None:
        raise DataError(f"give the {args.benchmark} folder with --data-dir")
    device = pick_device(args.device)
    loaded = load_any_model(args.model, args.checkpoint, device, args.pretrained)
    # ImageNet-C images are stored at 224 px already: no further crop (the authors' crop_pct 1.0).
    crop = args.crop_pct if args.crop_pct is not None else (1.0 if args.benchmark == "imagenet-c" else None)
    cfg = eval_data_config(loaded, args.img_size, crop, args.interpolation)
    runner = Runner(loaded, cfg, device, args.batch_size, args.workers, args.amp, args.on_error, args.max_images)
    out = output_dir(args, "robustness")
    root = Path(args.data_dir) / args.split if args.split else Path(args.data_dir)
    summary: dict[str, Any] = dict(
        model=loaded.name,
        checkpoint=args.checkpoint,
        benchmark=args.benchmark,
        data=str(root),
        input_size=cfg["input_size"][-1],
        crop_pct=cfg["crop_pct"],
    )

    if args.benchmark == "imagenet-c":
        res = imagenet_c(runner, root, args.corruptions, args.severities)
        summary.update(res)
        rows = [
            dict(
                corruption=c,
                **{f"error_s{s}": 100.0 * e for s, e in res["errors_by_severity"][c].items()},
                mean_error=v["mean_error"],
                alexnet_error=v["baseline_error"],
                ce=v["ce"],
            )
            for c, v in res["per_corruption"].items()
        ]
        files = [write_csv(out / "imagenet_c.csv", rows)]
        print(
            format_table(
                ["corruption", "mean top-1 error %", "AlexNet error %", "CE"],
                [[r["corruption"], r["mean_error"], r["alexnet_error"], r["ce"]] for r in rows],
            )
        )
        note = "" if res["complete"] else f"  (incomplete: {len(res['per_corruption'])} corruptions, not comparable)"
        print(f"mCE {res['mce']:.2f}  mean top-1 error {res['mean_error']:.2f}%{note}")
    else:
        subset = args.benchmark if args.benchmark in ("imagenet-a", "imagenet-r") else None
        data = image_folder(root)
        r = runner.run(data, subset)
        summary.update(r.summary())
        rows = [dict(benchmark=args.benchmark, **r.summary())]
        files = [write_csv(out / f"{args.benchmark}.csv", rows)]
        print(
            format_table(
                ["benchmark", "images", "top-1 %", f"top-{r.topk} %", "loss"],
                [[args.benchmark, r.n, r.top1, r.top5, r.loss]],
            )
        )
    report_skipped(runner.skipped)
    summary["skipped_images"] = runner.skipped
    files.insert(0, write_json(out / f"{args.benchmark}.json", summary))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0
