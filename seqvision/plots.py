"""Figures of results, drawn without pyplot (no global state, no display) and written atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .files import atomic_write


def new_figure(width: float, height: float) -> Figure:
    """An empty figure of ``width`` x ``height`` inches with constrained layout."""
    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """``fig`` as a PNG at ``path``."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))


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
                    colour = "white" if norm[t, p] > 0.5 else "black"
                    ax.text(p, t, str(confusion[t, p]), ha="center", va="center", fontsize=7, color=colour)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return save_figure(fig, path)
