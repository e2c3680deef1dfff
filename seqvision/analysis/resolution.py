"""``seqvision resolution-sweep``: accuracy of one trained model at several input sizes.

Sequencer has no position embedding and no size-dependent layer, so a model trained at one size can be
run at another; the paper's resolution-adaptability figure plots top-1 against the test size (0.5x to 2x
the training size here) and compares with other architectures. Every size keeps the model's crop
fraction and interpolation; only the final input size changes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..data import LabelledImages
from ..errors import DataError, UserError
from ..evaluate import eval_data_config, eval_loader, eval_transform, evaluate, num_outputs, target_mapping
from ..inference import LoadedModel
from ..plots import new_figure, save_figure

DEFAULT_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


def sweep_sizes(train_size: int, scales: Sequence[float] = DEFAULT_SCALES, min_size: int = 1) -> list[int]:
    """Input sizes ``round(scale * train_size)``, without duplicates or sizes below ``min_size``."""
    sizes = sorted({max(int(round(s * train_size)), 1) for s in scales})
    return [s for s in sizes if s >= min_size]


def resolution_sweep(
    loaded: LoadedModel,
    data: LabelledImages,
    sizes: Sequence[int],
    device: torch.device,
    crop_pct: float | None = None,
    batch_size: int = 64,
    workers: int = 0,
    amp: bool = False,
    on_error: str = "skip",
    train_size: int | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per size: model, size, scale (relative to ``train_size``, by default the model's own input
    size), top-1, top-5, loss.

    A size the model cannot take (e.g. a fixed-size ViT) gives a row with NaN accuracy and the reason.
    """
    train_size = train_size or eval_data_config(loaded)["input_size"][-1]
    mapping, _ = target_mapping(data.class_names, loaded.class_names, num_outputs(loaded.model))
    rows, skipped = [], []
    for size in sizes:
        loader = eval_loader(
            data, eval_transform(eval_data_config(loaded, size, crop_pct)), mapping, batch_size, workers
        )
        row: dict[str, Any] = dict(model=loaded.name, size=size, scale=size / train_size)
        try:
            r = evaluate(loaded.model, loader, device, amp, on_error=on_error, source=data.source)
        except DataError:  # unreadable data fails at every size alike: stop, naming it
            raise
        except (RuntimeError, AssertionError, UserError) as e:
            # Models tied to one input size fail here; record why and go on with the other sizes.
            row.update(
                top1=float("nan"),
                top5=float("nan"),
                loss=float("nan"),
                images=0,
                error=str(e).splitlines()[0] if str(e) else type(e).__name__,
            )
            print(f"  {loaded.name} @ {size}: cannot evaluate ({row['error']})", file=sys.stderr)
        else:
            row.update(top1=r.top1, top5=r.top5, loss=r.loss, images=r.n)
            if not skipped:
                skipped = r.skipped  # the same files fail at every size: report them once
            print(f"  {loaded.name} @ {size}: top-1 {r.top1:.2f}%", file=sys.stderr)
        rows.append(row)
    return rows, skipped


def plot_sweep(rows: Sequence[dict[str, Any]], path: str | Path, train_sizes: dict[str, int] | None = None) -> Path:
    """Top-1 against input size, one line per model; dashed lines mark each model's own size."""
    fig = new_figure(6, 4)
    ax = fig.add_subplot()
    for name in dict.fromkeys(r["model"] for r in rows):
        pts = [(r["size"], r["top1"]) for r in rows if r["model"] == name]
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)[0]
        if train_sizes and name in train_sizes:
            ax.axvline(train_sizes[name], color=line.get_color(), linestyle="--", linewidth=0.8)
    ax.set_xlabel("test input size (px)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("resolution adaptability")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path, dpi=120)
