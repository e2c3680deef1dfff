"""Where and in which precision a model runs: one choice of device and of autocast for every command."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn

from .errors import UserError


def pick_device(name: str | torch.device | None = "auto", local_rank: int | None = None) -> torch.device:
    """``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` (or ``mps``/``xpu``); a one-line
    UserError for a name torch does not know or a device this machine lacks.

    A bare ``cuda`` means this process's GPU under torchrun (``LOCAL_RANK``), so one recipe serves every rank.
    """
    local = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    if name in (None, "auto"):
        return torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"unknown device {str(name)!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None) if dev.type in ("cuda", "mps", "xpu") else None
    if backend is None or not backend.is_available():
        raise UserError(f"device {dev} was asked for but {dev.type} is not available here; use --device cpu")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if dev.index is not None and dev.index >= count:
        raise UserError(f"device {dev} was asked for but this machine has {count} {dev.type} device(s)")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local}")
    return dev


def amp_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """The autocast dtype: ``auto`` is float16 on CUDA (with a loss scaler when training) and bfloat16 on the
    CPU, the only half type CPU autocast supports well."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if name not in ("bfloat16", "float16"):
        raise UserError(f"amp dtype must be auto, bfloat16 or float16, got {name!r}")
    if name == "float16" and device.type != "cuda":
        raise UserError("float16 autocast needs CUDA; use bfloat16 on the CPU")
    return getattr(torch, name)


def autocast(
    device: torch.device, enabled: bool, dtype: torch.dtype | None = None
) -> contextlib.AbstractContextManager:
    """Mixed precision on ``device`` when ``enabled`` (``dtype`` defaults to ``amp_dtype(device)``)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype or amp_dtype(device))


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer reads the work's end and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def rnn_grad_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Let gradients flow through RNNs of a model in eval mode.

    cuDNN computes RNN backward only in training mode. Switching the RNN modules (and only them) to
    training mode changes nothing else for dropout-free RNNs, which is every Sequencer; RNNs with dropout
    are left alone and cuDNN is turned off instead.
    """
    rnns = [m for m in model.modules() if isinstance(m, nn.RNNBase)]
    switch = [m for m in rnns if m.dropout == 0 and not m.training]
    no_cudnn = any(m.dropout > 0 for m in rnns)
    for m in switch:
        m.train()
    try:
        with torch.backends.cudnn.flags(enabled=False) if no_cudnn else contextlib.nullcontext():
            yield model
    finally:
        for m in switch:
            m.eval()
