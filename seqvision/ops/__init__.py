"""The BiLSTM2D engine: one entry point, ``rnn2d``, with a reference path and fused kernels behind it.

``rnn2d(x, rnn_v, rnn_h, union)`` maps a B x H x W x C tensor to the joined RNN outputs. Engines:

- ``reference``: torch's nn.LSTM/GRU/RNN (oneDNN on CPU, cuDNN on CUDA), one call per direction;
- ``fused``: the C++ CPU kernel (``ops/fused.py``): one input-projection GEMM for all directions and the
  recurrences in lock-step, forward and backward;
- ``triton``: the persistent Triton kernel for CUDA (``ops/triton_lstm.py``);
- ``traceable``: the reference computation as one custom op, for torch.export with symbolic H and W;
- ``auto`` (default): Triton on CUDA where it covers the layer; on the CPU the fused kernel (faster than
  oneDNN's nn.LSTM in inference and training, and lighter in memory: benchmarks/RESULTS.md); the reference
  path everywhere else.

``LayerNorm`` (nn.LayerNorm with one-pass Triton forward and backward on CUDA) follows the same engine choice.
Any engine returns to the reference path for configurations it does not cover (Triton: GRU and tanh-RNN
cells; both: ReLU RNNs, stacked or projected RNNs).
``set_engine`` / ``use_engine`` choose; so does the environment variable ``SEQVISION_ENGINE``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..errors import EngineUnavailableError
from .layer_norm import LayerNorm
from .reference import CELL_NAMES, UNIONS, join, rnn2d_reference, rnn2d_traceable, run_horizontal, run_vertical

# "traceable": the reference computation as one custom op, so torch.export keeps H and W symbolic.
ENGINES = ("auto", "fused", "triton", "reference", "traceable")

# Dynamo refuses to look inside nn.LSTM / GRU / RNN modules unless this is set. seqvision only reads their
# weights while compiling and hands them to its own custom ops (above); it never traces nn.LSTM.forward.
torch._dynamo.config.allow_rnn = True
_engine = os.environ.get("SEQVISION_ENGINE", "auto") or "auto"
if _engine not in ENGINES:
    warnings.warn(f"SEQVISION_ENGINE={_engine!r} is not an engine ({', '.join(ENGINES)}); using auto", stacklevel=1)
    _engine = "auto"


def set_engine(name: str) -> None:
    """Select the BiLSTM2D engine for every model: "auto", "fused", "triton", "reference" or "traceable"."""
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


def cpu_has_bf16() -> bool:
    """Whether oneDNN has a bf16 path on this CPU (AVX-512, AVX512-BF16 or AMX). Without one, bf16 matmuls fall
    back to a reference kernel far slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _fused_impl():
    """The fused CPU engine's entry point, or None where it cannot run (no compiled extension)."""
    try:
        from . import fused
    except ImportError:
        return None
    return fused.rnn2d_fused if fused.available() else None


def _triton_impl(x: Tensor):
    """The Triton engine's entry point for ``x`` (CUDA, or Triton's interpreter when testing), or None."""
    if not (x.is_cuda or os.environ.get("SEQVISION_TRITON_INTERPRET") == "1"):
        return None
    try:
        from . import triton_lstm
    except ImportError:
        return None
    return triton_lstm.rnn2d_triton if triton_lstm.available(x) else None


def _cpu_auto_fused(rnn_v: nn.RNNBase | None, rnn_h: nn.RNNBase | None) -> bool:
    """auto on the CPU: the fused kernel for the cells it has (LSTM, GRU, tanh-RNN), in training and inference."""
    rnns = [r for r in (rnn_v, rnn_h) if r is not None]
    return all(type(r) in CELL_NAMES for r in rnns)  # not e.g. int8 dynamic-quantised RNNs: no reason to build


def rnn2d(x: Tensor, rnn_v: nn.RNNBase | None, rnn_h: nn.RNNBase | None, union: str) -> Tensor:
    """Token mixing of BiLSTM2D (without channel fusion) with the selected engine."""
    if _engine == "traceable" or (torch.compiler.is_compiling() and _engine == "reference"):
        return rnn2d_traceable(x, rnn_v, rnn_h, union)
    if _engine in ("auto", "triton", "fused"):
        if _engine == "fused" or (_engine == "auto" and x.device.type == "cpu" and _cpu_auto_fused(rnn_v, rnn_h)):
            impl = _fused_impl()
        else:
            impl = _triton_impl(x)
        if impl is not None:
            out = impl(x, rnn_v, rnn_h, union)
            if out is not None:  # None: this engine does not cover the configuration
                return out
        elif _engine != "auto":
            raise EngineUnavailableError(
                f"the {_engine} BiLSTM2D engine is not available here ({'CPU' if _engine == 'fused' else 'CUDA'} "
                "only, or it could not be built); use set_engine('auto') or set_engine('reference')"
            )
    if torch.compiler.is_compiling():  # nn.LSTM would break the graph: the same computation as one op
        return rnn2d_traceable(x, rnn_v, rnn_h, union)
    return rnn2d_reference(x, rnn_v, rnn_h, union)


__all__ = [
    "ENGINES",
    "LayerNorm",
    "UNIONS",
    "cpu_has_bf16",
    "get_engine",
    "join",
    "rnn2d",
    "rnn2d_reference",
    "run_horizontal",
    "run_vertical",
    "set_engine",
    "use_engine",
]
