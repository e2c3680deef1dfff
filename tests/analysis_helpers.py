"""A tiny Sequencer trained on the real digits data, shared by test_evaluate.py and test_analysis.py
(trained once per test session, ~15 s on 2 cores), and generated image trees."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from seqvision import create_model, ops
from seqvision.data import open_dataset
from seqvision.evaluate import eval_transform

TINY = dict(layers=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32), hidden_sizes=(4, 8, 8, 8))
# 28 px: the stem's 7x7 patches give a 4 x 4 token map, 2 x 2 after the second stage.
DATA_CONFIG = dict(input_size=(3, 28, 28), crop_pct=1.0, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)


def tensors(split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits of one split preprocessed with DATA_CONFIG, computed here independently of the evaluator."""
    data = open_dataset("digits", split)
    tf = eval_transform(DATA_CONFIG)
    items = data.samples[:limit]
    x = torch.stack([tf(img.convert("RGB")) for img, _ in items])
    return x, torch.tensor([t for _, t in items])


@functools.lru_cache(maxsize=1)
def trained_digits_checkpoint() -> Path:
    """A seqvision training checkpoint (weights under "model" plus the recorded variant, arguments,
    class names and preprocessing) of a tiny Sequencer trained for 3 epochs on digits (~90% val top-1)."""
    torch.manual_seed(0)
    x, y = tensors("train")
    model = create_model("sequencer2d_s", num_classes=10, **TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    with ops.use_engine("reference"):
        for _ in range(3):
            model.train()
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), 64):
                idx = perm[i : i + 64]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    path = Path(tempfile.mkdtemp(prefix="seqvision-test-")) / "digits_tiny.pth"
    ckpt = dict(
        model=model.state_dict(),
        model_name="sequencer2d_s",
        model_kwargs={k: list(v) for k, v in TINY.items()},
        class_names=[str(i) for i in range(10)],
        data_config=DATA_CONFIG,
        epoch=3,
    )
    torch.save(ckpt, path)
    return path


def save_image(array: np.ndarray, path: Path, mode: str = "L") -> Path:
    """An 8x8 digit (ink 0..16) as an image file of the given PIL mode."""
    img = Image.fromarray(np.asarray(array * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
    if mode != "L":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def digits_tree(root: Path, per_class: int = 5, transform=None, start: int = 0) -> list[tuple[Path, int]]:
    """Real validation digits written as grey-scale PNGs into ``root/<digit>/``; ``transform`` maps the
    8x8 float array first (e.g. a corruption). Returns (path, label) for each file."""
    data = open_dataset("digits", "val")
    counts: dict[int, int] = {}
    written = []
    for i, (img, t) in enumerate(data.samples[start:]):
        if counts.get(t, 0) >= per_class:
            continue
        counts[t] = counts.get(t, 0) + 1
        a = np.asarray(img, dtype=np.float64) * (16.0 / 255.0)
        if transform is not None:
            a = np.clip(transform(a), 0, 16)
        written.append((save_image(a, root / str(t) / f"{i:04d}.png"), t))
        if len(counts) == 10 and all(c >= per_class for c in counts.values()):
            break
    return written
