"""``seqvision validate``: top-1/top-5, loss, throughput, per-class accuracy and confusion matrix of a model on
a labelled data set (a built-in set, an ImageFolder tree or a torchvision set)."""

from __future__ import annotations

import argparse

from ..errors import UserError
from ..evaluate import eval_data_config, validate
from ..files import write_csv, write_json
from ..inference import load_any_model, quantize_dynamic
from ..plots import plot_confusion
from ..runtime import pick_device
from .common import add_model_args, format_table, open_data, output_dir, parser, report_skipped


def build_parser() -> argparse.ArgumentParser:
    p = parser(
        "seqvision validate",
        "Evaluate a trained model on a labelled data set: top-1/top-5 accuracy, loss, throughput and per-class "
        "accuracy, optionally a confusion-matrix PNG. Results are printed and written as JSON and CSV. "
        "Preprocessing is the model's own unless overridden.",
        [
            "seqvision validate --checkpoint runs/digits/best.pth --data-dir digits --confusion-matrix",
            "seqvision validate --model sequencer2d_s --checkpoint sequencer2d_s.pth --data-dir imagenet/val",
            "seqvision validate --checkpoint runs/c10/best.pth --dataset cifar10 --data-dir /data/cifar",
            "seqvision validate --model sequencer2d_s --pretrained --data-dir imagenet/val --img-size 288 --amp",
            "seqvision validate --checkpoint runs/demo/best.pth --data-dir digits --quantize dynamic   # int8",
        ],
    )
    add_model_args(p)
    p.add_argument("--confusion-matrix", action="store_true", help="also write confusion.png and confusion.csv")
    p.add_argument(
        "--quantize", choices=("dynamic",), help="int8 dynamic quantisation of LSTM/Linear weights (CPU only)"
    )
    return p


def run(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    if args.quantize and device.type != "cpu":
        raise UserError(f"--quantize dynamic runs on the CPU only; add --device cpu (got {device})")
    data = open_data(args)
    loaded = load_any_model(args.model, args.checkpoint, device, args.pretrained)
    if args.quantize:
        loaded.model = quantize_dynamic(loaded.model)
    cfg = eval_data_config(loaded, args.img_size, args.crop_pct, args.interpolation)
    result, how = validate(loaded, data, cfg, device, args.batch_size, args.workers, args.amp, args.on_error)
    report_skipped(result.skipped)

    out = output_dir(args, "validate")
    per_class = result.per_class(loaded.class_names)
    summary = dict(
        model=loaded.name,
        checkpoint=args.checkpoint,
        data=data.source,
        labels_matched=how,
        preprocessing={k: cfg[k] for k in ("input_size", "crop_pct", "interpolation", "mean", "std") if k in cfg},
        device=str(device),
        amp=args.amp,
        quantize=args.quantize,
        **result.summary(),
        skipped_images=result.skipped,
        per_class=per_class,
    )
    files = [write_json(out / "validate.json", summary), write_csv(out / "per_class.csv", per_class)]
    if args.confusion_matrix:
        names = loaded.class_names
        rows = [
            dict(true=names[t], **{names[p]: int(c) for p, c in enumerate(row)})
            for t, row in enumerate(result.confusion)
        ]
        files.append(write_csv(out / "confusion.csv", rows))
        files.append(plot_confusion(result.confusion, names, out / "confusion.png", f"{loaded.name} on {data.source}"))

    size = cfg["input_size"][-1]
    print(f"{loaded.name} on {data.source}: {result.n} images at {size} px (labels matched {how})")
    print(
        format_table(
            ["top-1 %", f"top-{result.topk} %", "loss", "images/s", "skipped"],
            [[result.top1, result.top5, result.loss, result.throughput, len(result.skipped)]],
        )
    )
    print()
    print(format_table(["class", "images", "top-1 %"], [[r["name"], r["images"], r["accuracy"]] for r in per_class]))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0
