"""The BiLSTM2D engine: one entry point, ``rnn2d``, with a reference path and fused kernels behind it.

``rnn2d(x, rnn_v, rnn_h, union)`` maps a B x H x W x C tensor to the joined RNN outputs. Which
implementation runs is chosen per call: the fused engine where it supports the inputs, else the
reference path (torch's nn.LSTM/GRU/RNN). ``set_engine`` / ``use_engine`` force a choice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .reference import UNIONS, join, rnn2d_reference, rnn2d_traceable, run_horizontal, run_vertical

# "traceable": the reference computation as one custom op, so torch.export keeps H and W symbolic.
ENGINES = ("auto", "fused", "reference", "traceable")

# Dynamo refuses to look inside nn.LSTM / GRU / RNN modules unless this is set. seqvision only reads their
# weights while compiling and hands them to its own custom ops (above); it never traces nn.LSTM.forward.
torch._dynamo.config.allow_rnn = True
_engine = "auto"


def set_engine(name: str) -> None:
    """Select the BiLSTM2D engine for every model: "auto" (fused where supported), "fused" or "reference"."""
    global _engine
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    _engine = name


def get_engine() -> str:
    """The engine currently selected by ``set_engine``."""
    return _engine


@contextlib.contextmanager
def use_engine(name: str) -> Iterator[None]:
    """Context manager form of ``set_engine``; restores the previous choice on exit."""
    previous = _engine
    set_engine(name)
    try:
        yield
    finally:
        set_engine(previous)


def _fused_impl():
    """The fused engine's entry point, or None where it cannot run (no compiled extension)."""
    try:
        from . import fused
    except ImportError:
        return None
    return fused.rnn2d_fused if fused.available() else None


def rnn2d(x: Tensor, rnn_v: nn.RNNBase | None, rnn_h: nn.RNNBase | None, union: str) -> Tensor:
    """Token mixing of BiLSTM2D (without channel fusion) with the selected engine."""
    if _engine == "traceable" or (torch.compiler.is_compiling() and _engine == "reference"):
        return rnn2d_traceable(x, rnn_v, rnn_h, union)
    if _engine != "reference":
        impl = _fused_impl()
        if impl is not None:
            out = impl(x, rnn_v, rnn_h, union)
            if out is not None:  # None: the fused engine does not cover this configuration
                return out
        elif _engine == "fused":
            raise RuntimeError("the fused BiLSTM2D engine is not available here; use set_engine('reference')")
    return rnn2d_reference(x, rnn_v, rnn_h, union)


__all__ = [
    "ENGINES",
    "UNIONS",
    "get_engine",
    "join",
    "rnn2d",
    "rnn2d_reference",
    "run_horizontal",
    "run_vertical",
    "set_engine",
    "use_engine",
]
