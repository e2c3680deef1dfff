"""``seqvision predict``: classify image files with a trained model."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import torch
from timm.data import create_transform

from .errors import UserError
from .images import display_path, open_image
from .inference import LoadedModel

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def expand_inputs(items: list[str]) -> tuple[list[Path], list[str]]:
    """Files, directories (searched recursively for images) and glob patterns -> (image paths, problems)."""
    paths, problems = [], []
    for item in items:
        try:
            found, problem = _expand(item)
        except OSError as e:  # e.g. a directory that cannot be listed
            found, problem = [], f"{display_path(item)}: cannot read ({e.strerror or type(e).__name__})"
        paths += found
        if problem:
            problems.append(problem)
    return paths, problems


def _expand(item: str) -> tuple[list[Path], str | None]:
    p = Path(item)
    if p.is_dir():
        found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        return found, None if found else f"{display_path(item)}: no images in this directory"
    if p.exists() or p.is_symlink():  # a dangling link is reported by open_image, by path
        return [p], None
    if any(ch in item for ch in "*?["):
        found = sorted(Path(f) for f in glob.glob(item, recursive=True) if os.path.isfile(f))
        return found, None if found else f"{display_path(item)}: the pattern matches no file"
    return [], f"{display_path(item)}: no such file"


@torch.no_grad()
def predict(
    loaded: LoadedModel, paths: list[Path], topk: int = 5, batch_size: int = 32
) -> tuple[list[dict], list[str]]:
    """Top-k predictions for each readable image; unreadable files are returned as problems."""
    transform = create_transform(**loaded.data_config)
    device = next(loaded.model.parameters()).device
    k = min(topk, len(loaded.class_names))
    results, problems = [], []
    batch: list[tuple[Path, torch.Tensor]] = []

    def flush() -> None:
        if not batch:
            return
        x = torch.stack([t for _, t in batch]).to(device)
        probs = loaded.model(x).float().softmax(-1)
        values, indices = probs.topk(k, dim=-1)
        for (path, _), v, i in zip(batch, values.tolist(), indices.tolist(), strict=True):
            preds = [
                {"class": loaded.class_names[c], "index": c, "prob": round(p, 6)} for p, c in zip(v, i, strict=True)
            ]
            results.append({"path": os.fsdecode(path), "predictions": preds})
        batch.clear()

    for path in paths:
        try:
            batch.append((path, transform(open_image(path))))
        except UserError as e:
            problems.append(str(e))
        if len(batch) == batch_size:
            flush()
    flush()
    return results, problems
