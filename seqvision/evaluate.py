"""Evaluation: the one loop that scores a model on labelled images, for ``seqvision validate``, the analysis
commands and the trainer's validation (summed over ranks there).

Images are preprocessed with the model's own configuration (``timm.data.resolve_data_config`` over the
checkpoint's or the model's ``pretrained_cfg``) unless overridden. A data set's classes are matched to the
model's outputs by name, by ImageNet wnid or by position (``target_mapping``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import ImageNetInfo, create_transform
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms

from .data import ImageDataset, LabelledImages, collate
from .errors import DataError, UserError
from .images import display_path
from .inference import LoadedModel
from .runtime import autocast, synchronize

ON_ERROR = ("skip", "fail")


# -- matching a data set to a model ------------------------------------------------------------------------
@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k WordNet ids in class-index order (timm's offline table)."""
    return tuple(ImageNetInfo().label_names())


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


def num_outputs(model: nn.Module) -> int:
    """The classifier's output count; UserError for a model without a head."""
    n = getattr(model, "num_classes", None)
    if not n:
        raise UserError("the model has no classifier (num_classes = 0): evaluate a model with a head")
    return int(n)


def eval_data_config(
    loaded: LoadedModel,
    img_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
) -> dict[str, Any]:
    """The model's preprocessing (timm's data config) with the given overrides applied."""
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
    ``normalize=False`` float images in [0, 1] (what attacks perturb)."""
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    tf = create_transform(**{k: cfg[k] for k in keys if k in cfg}, is_training=False, normalize=normalize)
    if not normalize:  # timm then stops at uint8 tensors
        tf = transforms.Compose([*tf.transforms, transforms.ConvertImageDtype(torch.float32)])
    return tf


def eval_loader(
    data: LabelledImages,
    transform: Any,
    target_map: Sequence[int] | None = None,
    batch_size: int = 64,
    workers: int = 0,
) -> DataLoader:
    """Batches of ``data`` in order, each ``(images, targets, problems)``; unreadable images are left out of the
    batch and named in its problems."""
    ds = ImageDataset(data.samples, transform, target_map)
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate)


# -- the loop ----------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    """Accuracy of one model on one data set, as sums (so that results of several ranks add up).

    ``confusion[t, p]`` counts images of class t predicted as p. The properties give percentages and the
    mean cross-entropy.
    """

    n: int
    correct1: int
    correctk: int
    topk: int
    loss_sum: float
    confusion: np.ndarray
    model_seconds: float
    wall_seconds: float
    skipped: list[str] = field(default_factory=list)

    @property
    def top1(self) -> float:
        return 100.0 * self.correct1 / self.n if self.n else float("nan")

    @property
    def top5(self) -> float:
        """Top-k accuracy with k = ``topk`` (5, or the class count when there are fewer)."""
        return 100.0 * self.correctk / self.n if self.n else float("nan")

    @property
    def loss(self) -> float:
        return self.loss_sum / self.n if self.n else float("nan")

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
        return [
            dict(
                index=i,
                name=names[i],
                images=int(total),
                correct=int(self.confusion[i, i]),
                accuracy=100.0 * self.confusion[i, i] / total,
            )
            for i, total in enumerate(totals)
            if total
        ]

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
    """(images, targets) from a loader of ``collate`` batches (or plain (x, y) batches).

    Problems are appended to ``skipped``; with ``on_error="fail"`` the first one raises DataError.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}")
    for batch in loader:
        x, y = batch[0], batch[1]
        problems = batch[2] if len(batch) > 2 else []
        if problems:
            if on_error == "fail":
                more = f" (and {len(problems) - 1} more in this batch)" if len(problems) > 1 else ""
                raise DataError(f"{problems[0]}{more}")
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
    class_index: Sequence[int] | None = None,
    num_classes: int | None = None,
    on_error: str = "skip",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    allow_empty: bool = False,
    source: str | None = None,
) -> EvalResult:
    """Top-1 / top-k accuracy, loss and confusion matrix of ``model`` over ``loader``.

    ``class_index`` keeps only those output columns, in that order (the 200-class ImageNet-A / -R subsets of a
    1000-way model); targets then index into the kept columns. Targets below 0 mark padding (a sharded
    validation set) and are not counted. With no image at all, DataError (naming ``source``, the data) unless
    ``allow_empty``.
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
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        synchronize(device)
        t0 = time.perf_counter()
        with autocast(device, amp, amp_dtype):
            logits = model(x)
        synchronize(device)
        model_s += time.perf_counter() - t0
        logits = logits.float()
        if idx is not None:
            logits = logits.index_select(1, idx)
        real = y >= 0
        logits, y = logits[real], y[real]
        if not len(y):
            continue
        if int(y.max()) >= logits.shape[1]:
            raise DataError(f"a target ({int(y.max())}) is outside the model's {logits.shape[1]} classes")
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(k, dim=1).indices
        hit = top.eq(y[:, None])
        correct1 += int(hit[:, 0].sum())
        correctk += int(hit.any(1).sum())
        confusion += torch.bincount((y * n_cls + top[:, 0]).cpu(), minlength=n_cls * n_cls)
        n += len(y)
    if n == 0 and not allow_empty:
        where = f" in {display_path(source)}" if source else ""
        why = f" ({len(skipped)} unreadable; the first: {skipped[0]})" if skipped else ""
        raise DataError(f"no image{where} could be evaluated{why}")
    return EvalResult(
        n=n,
        correct1=correct1,
        correctk=correctk,
        topk=k,
        loss_sum=loss_sum,
        confusion=confusion.view(n_cls, n_cls).numpy(),
        model_seconds=model_s,
        wall_seconds=time.perf_counter() - start,
        skipped=skipped,
    )


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
    loader = eval_loader(data, eval_transform(cfg), mapping, batch_size, workers)
    return evaluate(loaded.model, loader, device, amp, on_error=on_error, source=data.source), how
