"""What a run leaves behind for people: the log (printed and in log.txt), metrics.csv, TensorBoard events,
curves.png and summary.json. Only rank 0 writes; every file is rewritten whole, so a resumed run has no
duplicate rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..files import write_csv, write_json
from ..plots import new_figure, save_figure


class RunRecords:
    """The records of one run in ``out``; every method is a no-op on ranks other than 0."""

    def __init__(self, out: Path, is_main: bool):
        self.out = out
        self.is_main = is_main
        self.writer: Any = None

    def log(self, msg: str) -> None:
        """Print a line and append it to log.txt."""
        if not self.is_main:
            return
        print(msg, flush=True)
        with open(self.out / "log.txt", "a") as f:
            f.write(msg + "\n")

    def open_tensorboard(self, start_epoch: int) -> None:
        """Start TensorBoard logging; a resumed run drops the events of the epochs it trains again."""
        if not self.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard may not be installed
        except ImportError:
            self.log("  (tensorboard is not installed: no TensorBoard logs)")
            return
        self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=start_epoch + 1 if start_epoch else None)

    def epoch(self, m: dict[str, float], history: list[dict[str, float]], total_epochs: int, is_best: bool) -> None:
        """One epoch's line, metrics.csv with every epoch so far, and its TensorBoard scalars."""
        if not self.is_main:
            return
        ema = f"  ema top-1 {m['ema_top1']:.2f}" if "ema_top1" in m else ""
        self.log(
            f"epoch {m['epoch']}/{total_epochs}  train loss {m['train_loss']:.4f}  val loss "
            f"{m['val_loss']:.4f}  top-1 {m['top1']:.2f}  top-5 {m['top5']:.2f}{ema}  lr {m['lr']:.3g}  "
            f"{m['img_per_s']:.0f} img/s  {m['epoch_seconds']:.1f} s" + ("  *best" if is_best else "")
        )
        write_csv(self.out / "metrics.csv", history)
        if self.writer is not None:
            for k, v in m.items():
                if k != "epoch":
                    self.writer.add_scalar(k, v, m["epoch"])
            self.writer.flush()

    def finish(self, summary: dict[str, Any], history: list[dict[str, float]]) -> None:
        """summary.json and curves.png."""
        if not self.is_main:
            return
        write_json(self.out / "summary.json", summary)
        plot_curves(history, self.out / "curves.png")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    """Loss, accuracy and learning rate per epoch, side by side."""
    ep = [h["epoch"] for h in history]
    fig = new_figure(13, 3.6)
    ax = fig.subplots(1, 3)
    ax[0].plot(ep, [h["train_loss"] for h in history], label="train")
    ax[0].plot(ep, [h["val_loss"] for h in history], label="validation")
    ax[0].set(title="loss", xlabel="epoch")
    ax[1].plot(ep, [h["top1"] for h in history], label="top-1")
    ax[1].plot(ep, [h["top5"] for h in history], label="top-5")
    if history and "ema_top1" in history[0]:
        ax[1].plot(ep, [h["ema_top1"] for h in history], label="EMA top-1")
    ax[1].set(title="validation accuracy (%)", xlabel="epoch")
    ax[2].plot(ep, [h["lr"] for h in history])
    ax[2].set(title="learning rate (end of epoch)", xlabel="epoch")
    for a in ax[:2]:
        a.legend()
    for a in ax:
        a.grid(alpha=0.3)
    save_figure(fig, path, dpi=110)
