"""``seqvision robustness``: accuracy under distribution shift.

- ImageNet-C (Hendrycks & Dietterich, ICLR 2019): 15 corruptions x 5 severities in a
  ``<root>/<corruption>/<severity>/<class>/<image>`` tree. For each corruption c the corruption error is
  CE_c = mean over severities of the top-1 error / AlexNet's mean top-1 error on c, and mCE = 100 x the
  mean of CE_c over the 15 corruptions. Evaluated at crop_pct 1.0 (the images are already 224 px),
  as the Sequencer authors do.
- ImageNet-A and ImageNet-R: 200-class subsets of ImageNet-1k; a 1000-way model is scored on its 200
  logits of those classes only (the standard protocol).
- ImageNet-Sketch, or any other ImageFolder tree: plain top-1 / top-5.

Classes are matched by folder name (ImageNet wnids, or the class names a checkpoint records), so the same
code runs on partial trees and on any data set laid out the same way.
"""

from __future__ import annotations

import pkgutil
import sys
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import LabelledImages, image_folder
from ..errors import DataError
from ..evaluate import (
    EvalResult,
    eval_loader,
    eval_transform,
    evaluate,
    num_outputs,
    target_mapping,
)
from ..inference import LoadedModel

# AlexNet's top-1 error on each ImageNet-C corruption, averaged over the 5 severities: the normaliser of
# CE. Published with ImageNet-C (Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
# Corruptions and Perturbations", ICLR 2019; github.com/hendrycks/robustness, ImageNet-C/test.py), and
# the same values the Sequencer authors' validate_c.py uses. E.g. gaussian_noise: the per-severity errors
# .69528, .82542, .93554, .98138, .99452 average to .886428.
ALEXNET_ERRORS: dict[str, float] = {
    "gaussian_noise": 0.886428,
    "shot_noise": 0.894468,
    "impulse_noise": 0.922640,
    "defocus_blur": 0.819880,
    "glass_blur": 0.826268,
    "motion_blur": 0.785948,
    "zoom_blur": 0.798360,
    "snow": 0.866816,
    "frost": 0.826572,
    "fog": 0.819324,
    "brightness": 0.564592,
    "contrast": 0.853204,
    "elastic_transform": 0.646056,
    "pixelate": 0.717840,
    "jpeg_compression": 0.606500,
}
CORRUPTIONS = tuple(ALEXNET_ERRORS)
SEVERITIES = (1, 2, 3, 4, 5)
BENCHMARKS = ("imagenet-c", "imagenet-a", "imagenet-r", "imagenet-sketch", "folder")


@lru_cache(maxsize=4)
def subset_classes(subset: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The 200 wnids of ImageNet-A or -R and their ImageNet-1k class indices.

    The standard lists (Hendrycks et al., "Natural Adversarial Examples" and "The Many Faces of
    Robustness") as shipped in timm's offline tables (timm/data/_info/imagenet_{a,r}_*.txt)."""
    key = {"imagenet-a": "a", "imagenet-r": "r"}[subset]
    synsets = pkgutil.get_data("timm.data", f"_info/imagenet_{key}_synsets.txt").decode().split()
    indices = pkgutil.get_data("timm.data", f"_info/imagenet_{key}_indices.txt").decode().split()
    return tuple(synsets), tuple(int(i) for i in indices)


def corruption_errors(
    errors: Mapping[str, Sequence[float]], baseline: Mapping[str, float] = ALEXNET_ERRORS
) -> dict[str, Any]:
    """CE per corruption and mCE from top-1 errors (fractions) per corruption and severity.

    Returns ``{"per_corruption": {c: {"errors", "mean_error", "baseline_error", "ce"}}, "mce",
    "mean_error", "complete"}`` with CE, mCE and mean error in percent. ``complete`` is False when not all
    of the 15 standard corruptions with all 5 severities were measured (then mCE is not comparable).
    """
    per: dict[str, dict[str, Any]] = {}
    for name, errs in errors.items():
        if name not in baseline:
            raise DataError(f"no AlexNet baseline for corruption {name!r}; known: {', '.join(baseline)}")
        if not errs:
            continue
        mean = float(np.mean(errs))
        per[name] = dict(
            errors=[float(e) for e in errs],
            mean_error=100.0 * mean,
            baseline_error=100.0 * baseline[name],
            ce=100.0 * mean / baseline[name],
        )
    if not per:
        raise DataError("no corruption was measured")
    complete = set(per) == set(baseline) and all(len(v["errors"]) == len(SEVERITIES) for v in per.values())
    return dict(
        per_corruption=per,
        mce=float(np.mean([v["ce"] for v in per.values()])),
        mean_error=float(np.mean([v["mean_error"] for v in per.values()])),
        complete=complete,
    )


class Runner:
    """Evaluates one loaded model on ImageFolder trees with one preprocessing."""

    def __init__(
        self,
        loaded: LoadedModel,
        cfg: dict[str, Any],
        device: torch.device,
        batch_size: int = 64,
        workers: int = 0,
        amp: bool = False,
        on_error: str = "skip",
        max_images: int | None = None,
    ):
        self.loaded, self.cfg, self.device = loaded, cfg, device
        self.batch_size, self.workers, self.amp, self.on_error = batch_size, workers, amp, on_error
        self.transform = eval_transform(cfg)
        self.skipped: list[str] = []
        self.max_images = max_images

    def run(self, data: LabelledImages, subset: str | None = None) -> EvalResult:
        """Top-1 etc. on ``data``; ``subset`` ("imagenet-a"/"imagenet-r") scores the 200 masked logits."""
        data = data.subsample(self.max_images)
        if subset is None:
            mapping, _ = target_mapping(data.class_names, self.loaded.class_names, num_outputs(self.loaded.model))
            class_index = None
        else:
            wnids, indices = subset_classes(subset)
            if num_outputs(self.loaded.model) != 1000:
                raise DataError(f"{subset} is scored on ImageNet-1k logits: the model must have 1000 classes")
            pos = {w: i for i, w in enumerate(wnids)}
            unknown = [c for c in data.class_names if c not in pos]
            if unknown:
                raise DataError(f"{data.source}: folders {unknown[:5]} are not {subset} classes (wnids expected)")
            mapping, class_index = [pos[c] for c in data.class_names], list(indices)
        result = evaluate(
            self.loaded.model,
            eval_loader(data, self.transform, mapping, self.batch_size, self.workers),
            self.device,
            self.amp,
            class_index=class_index,
            on_error=self.on_error,
            source=data.source,
        )
        self.skipped += result.skipped
        return result


def imagenet_c(
    runner: Runner, root: str | Path, corruptions: Sequence[str] = CORRUPTIONS, severities: Sequence[int] = SEVERITIES
) -> dict[str, Any]:
    """Top-1 error at every corruption and severity found under ``root``, and CE / mCE."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"ImageNet-C directory not found: {root}")
    errors: dict[str, list[float]] = {}
    by_severity: dict[str, dict[int, float]] = {}
    missing: list[str] = []
    for c in corruptions:
        errs = []
        for s in severities:
            d = root / c / str(s)
            if not d.is_dir():
                missing.append(f"{c}/{s}")
                continue
            r = runner.run(image_folder(d))
            errs.append(r.error)
            by_severity.setdefault(c, {})[s] = r.error
            print(f"  {c:18s} severity {s}: top-1 {r.top1:6.2f}%  ({r.n} images)", file=sys.stderr)
        if errs:
            errors[c] = errs
    if not errors:
        raise DataError(f"{root} holds none of the corruptions as <corruption>/<severity>/ (e.g. {CORRUPTIONS[0]}/1)")
    out = corruption_errors(errors)
    out["missing"] = missing
    out["errors_by_severity"] = by_severity
    return out
