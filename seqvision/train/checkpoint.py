"""Training checkpoints: the whole state of a run (weights, optimiser, scheduler, scaler, EMA, RNG states and
the position inside the epoch), written atomically and read back with ``weights_only=True``.

Besides the training state, a checkpoint records what ``seqvision.inference.load_model`` needs to rebuild the
model from the file alone: ``model_name``, ``model_kwargs``, ``class_names`` and ``data_config``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from ..errors import CheckpointError, ConfigError
from ..files import atomic_write

KIND = "seqvision-train"
VERSION = 1


def fresh_running() -> dict[str, float]:
    """The sums over an epoch, before its first batch."""
    return {"loss_sum": 0.0, "samples": 0.0, "updates": 0.0}


@dataclass
class Progress:
    """How far a run has come: saved in every checkpoint beside the weights, restored on --resume."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_top1: float = -1.0
    best_epoch: int = -1
    num_updates: int = 0
    train_seconds: float = 0.0
    running: dict[str, float] = field(default_factory=fresh_running)  # sums over the current epoch

    def to_state(self, train_seconds: float) -> dict[str, Any]:
        return {
            "history": self.history,
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "num_updates": self.num_updates,
            "train_seconds": train_seconds,
            "running": dict(self.running),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], mid_epoch: bool) -> Progress:
        running = dict(state["running"]) if mid_epoch else fresh_running()
        return cls(
            list(state["history"]),
            state["best_top1"],
            state["best_epoch"],
            state["num_updates"],
            state["train_seconds"],
            running,
        )


def read_training_checkpoint(run_or_file: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """(path, state) of a run directory's ``last.pth`` or of a checkpoint file; one-line errors otherwise."""
    path = Path(run_or_file)
    if path.is_dir():
        path = path / "last.pth"
    if not path.is_file():
        raise ConfigError(f"nothing to resume: {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure, including a refused (unsafe) object
        raise CheckpointError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(state, dict) or state.get("kind") != KIND:
        raise CheckpointError(f"{path} is not a seqvision training checkpoint; use --finetune for weights")
    return path, state


def save_checkpoint(state: dict[str, Any], out_dir: str | os.PathLike, *names: str) -> None:
    """Serialise ``state`` once and write it to each of ``names`` in ``out_dir`` (temporary file, then rename)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    for name in names:
        atomic_write(Path(out_dir) / name, lambda tmp: Path(tmp).write_bytes(data))


def model_state(model: nn.Module, sharded: bool) -> dict[str, Tensor]:
    """The full weights on the CPU; collective under FSDP (every rank must call it)."""
    if sharded:
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict[str, Any]:
    """The optimiser's full state; collective under FSDP."""
    if sharded:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, optimizer, options=options)
    return optimizer.state_dict()


def restore_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], sharded: bool) -> None:
    """Load a full optimiser state; under FSDP each rank keeps its own shard of it."""
    if sharded:
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
