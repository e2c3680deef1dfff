"""The numbers and figures of ``seqvision study resolution``: how cross-shaped an ERF is, the top-1 statistics over
seeds, the resolution plot and the ERF panels."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..plots import new_figure, save_figure


# -- statistics ------------------------------------------------------------------------------------------
def cross_share(erf: np.ndarray, rows: tuple[int, int], cols: tuple[int, int]) -> float:
    """How cross-shaped an ERF map is around the input square ``rows`` x ``cols`` (half-open pixel ranges: the
    patch of the probed centre position). Ring by ring around that square, the mean ERF in the row and column
    bands through it (the square itself left out) is compared with the mean outside both bands; the share is
    sum(band means) / sum(band means + outside means), over the rings that hold both.

    0.5 for a round ERF, 1 for a pure cross, below 0.5 for an X; NaN for an empty map. It puts a number on the
    paper's "cross-shaped ERF" so that architectures can be compared without reading heat maps.
    """
    m = np.asarray(erf, dtype=np.float64)
    if m.ndim != 2 or not np.isfinite(m).all() or m.max() <= 0:
        return float("nan")
    r, c = np.indices(m.shape)
    in_rows = (r >= rows[0]) & (r < rows[1])
    in_cols = (c >= cols[0]) & (c < cols[1])
    band = (in_rows | in_cols) & ~(in_rows & in_cols)
    outside = ~(in_rows | in_cols)
    ring = np.rint(np.hypot(r - (rows[0] + rows[1] - 1) / 2, c - (cols[0] + cols[1] - 1) / 2)).astype(int)
    on_sum = off_sum = 0.0
    for d in np.unique(ring):
        on, off = m[(ring == d) & band], m[(ring == d) & outside]
        if on.size and off.size:
            on_sum += float(on.mean())
            off_sum += float(off.mean())
    return on_sum / (on_sum + off_sum) if on_sum + off_sum > 0 else float("nan")


def centre_patch(info: dict[str, Any], input_size: int, prefix_tokens: int = 0) -> tuple[tuple[int, int], ...]:
    """The input pixels (row range, column range) under the feature position an ERF was taken at, from
    ``effective_receptive_field``'s per-layer record (feature shape, layout, centre)."""
    shape, layout = info["feature_shape"], info["layout"]
    if layout == "tokens":
        h = w = math.isqrt(shape[0] - prefix_tokens)
    elif layout == "NHWC":
        h, w = shape[0], shape[1]
    else:
        h, w = shape[1], shape[2]
    (r, c), sy, sx = info["centre"], input_size / h, input_size / w
    return (round(r * sy), round((r + 1) * sy)), (round(c * sx), round((c + 1) * sx))


def mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean and sample standard deviation (0 for one value) of the finite values, and how many there were."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def summarise(rows: Sequence[dict[str, Any]], train_size: int) -> list[dict[str, Any]]:
    """Per architecture and test size: top-1 mean / sd / min / max over seeds, and the drop in points from
    the same seed's accuracy at the training size (mean and sd), the measure of resolution adaptability."""
    at_train = {(r["arch"], r["seed"]): r["top1"] for r in rows if r["size"] == train_size}
    out = []
    for arch in dict.fromkeys(r["arch"] for r in rows):
        for size in sorted({r["size"] for r in rows if r["arch"] == arch}):
            these = [r for r in rows if r["arch"] == arch and r["size"] == size]
            top1 = [r["top1"] for r in these]
            mean, sd, n = mean_sd(top1)
            drops = [at_train[(arch, r["seed"])] - r["top1"] for r in these if (arch, r["seed"]) in at_train]
            drop, drop_sd, _ = mean_sd(drops)
            finite = [x for x in top1 if math.isfinite(x)]
            out.append(
                dict(
                    arch=arch,
                    size=size,
                    scale=size / train_size,
                    seeds=n,
                    top1_mean=mean,
                    top1_sd=sd,
                    top1_min=min(finite) if finite else float("nan"),
                    top1_max=max(finite) if finite else float("nan"),
                    drop_mean=drop,
                    drop_sd=drop_sd,
                )
            )
    return out


# -- figures --------------------------------------------------------------------------------------------
def plot_resolution(
    summary: Sequence[dict[str, Any]], path: Path, train_size: int, title: str, labels: dict[str, str]
) -> Path:
    """Top-1 against test size: one line per architecture (mean over seeds, labelled by ``labels``), a band
    from the worst to the best seed, a dashed line at the training size."""
    fig = new_figure(6.4, 4.2)
    ax = fig.add_subplot()
    for arch in dict.fromkeys(r["arch"] for r in summary):
        pts = [r for r in summary if r["arch"] == arch and math.isfinite(r["top1_mean"])]
        if not pts:
            continue
        x = [r["size"] for r in pts]
        line = ax.plot(x, [r["top1_mean"] for r in pts], marker="o", label=labels.get(arch, arch))[0]
        ax.fill_between(
            x, [r["top1_min"] for r in pts], [r["top1_max"] for r in pts], color=line.get_color(), alpha=0.2
        )
    ax.axvline(train_size, color="grey", linestyle="--", linewidth=0.8, label=f"training size ({train_size} px)")
    ax.set_xlabel("test input size (px)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=100)


def plot_erf_panel(maps: dict[str, np.ndarray], path: Path, title: str) -> Path:
    """One architecture's ERF maps side by side, already scaled to 0..1 by one shared min-max."""
    fig = new_figure(2.2 * len(maps) + 0.8, 2.6)
    axes = fig.subplots(1, len(maps), squeeze=False)[0]
    im = None
    for ax, (name, m) in zip(axes, maps.items(), strict=True):
        im = ax.imshow(m, cmap="RdYlGn", vmin=0, vmax=1)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="log10(grad + 1), scaled")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=80)
