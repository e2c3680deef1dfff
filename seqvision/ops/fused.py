"""Fused CPU engine for BiLSTM2D token mixing (a compiled C++ kernel, built on first use).

The engine computes exactly what ``rnn2d_reference`` computes for LSTM token mixers, and for the GRU and
tanh-RNN variants (gru_sequencer2d_s, rnn_sequencer2d_s), faster:

- one GEMM gives the input projections of all four directions for every token;
- the four recurrences run in lock-step in C++, each thread owning a slice of the sequences for the whole
  time loop (no barrier per step); per step and direction one small GEMM (h_prev @ W_hh^T) is followed by a
  fused gate loop, and each h is written straight into the final B x H x W x 4D output;
- bfloat16 (also under CPU autocast) runs the input-projection GEMM in bf16; gates and cell state stay fp32,
  and so do the recurrent products unless ``SEQVISION_BF16_RECURRENCE=1`` (or ``use_bf16_recurrence``) gives
  them bf16 operands with fp32 accumulation, on the AMX tiles where the CPU has them (``bf16_recurrence_kernel``);
- training saves the gates (and the LSTM's cell states); the backward runs the reverse-time recurrence in
  C++ and gets dx and every weight gradient from a few large GEMMs.

It is exposed as the custom ops ``seqvision::rnn2d_fused`` / ``seqvision::rnn2d_fused_backward`` (fake kernels
and autograd registered), so ``torch.compile(fullgraph=True)`` sees one opaque node per token mixer.

``rnn2d_fused`` returns None for what it does not cover (ReLU RNNs, stacked or projected RNNs, mixed cell
types, other devices or dtypes); the caller then runs the reference path. ``SEQVISION_NO_FUSED=1`` switches
it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn

from .packing import gru_hn_bias, packed_weights, records_grad
from .reference import CELL_NAMES

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = [_CSRC / "rnn2d.cpp"]
# -march=native: the gate loop's exp/sigmoid/tanh vectorise to the widest ISA present (AVX-512 here);
# -fopenmp-simd honours `#pragma omp simd` (also where torch has no OpenMP). -fopenmp: the kernels' threads come
# from at::parallel_for, an `omp parallel` pragma expanded in our own file, which without the flag runs on one
# thread (see parallel_threads); the extension then binds to the libgomp torch has already loaded, not a second.
# A compiler without OpenMP (Apple clang) gets a second try without it: serial recurrences, still fused.
_OPENMP = ["-fopenmp"] if torch.backends.openmp.is_available() else []
_CFLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", *_OPENMP]

_ext: ModuleType | None = None
_load_error: str | None = None


def _build_name(cflags: list[str]) -> str:
    """Extension name tied to this CPU, torch version and flags: a -march=native build must not run elsewhere."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        cpu = platform.processor()
    key = f"{cpu}|{torch.__version__}|{' '.join(cflags)}".encode()
    return "seqvision_fused_" + hashlib.sha1(key).hexdigest()[:10]


def _cpp_extension() -> ModuleType:
    """``torch.utils.cpp_extension``, imported without the "No CUDA runtime is found" warning it logs on import
    on a CPU-only machine that has a CUDA toolkit: this engine compiles C++ only, so that line is noise."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def _is_cached(name: str) -> bool:
    """Whether torch's extension cache already holds a build of ``name`` (True when that cannot be told: the
    notice below is only a courtesy)."""
    try:
        return (Path(_cpp_extension()._get_build_directory(name, False)) / f"{name}.so").exists()
    except Exception:
        return True


def _build(cflags: list[str]) -> ModuleType:
    """Compile (or load the cached build of) the kernels with these flags; raises where that fails."""
    name = _build_name(cflags)
    if not _is_cached(name):
        print(
            "seqvision: compiling the fused CPU BiLSTM2D engine (first use with this CPU and torch; about "
            "30 s on 2 cores, then cached)",
            file=sys.stderr,
            flush=True,
        )
    _cpp_extension().load(
        name=name,
        sources=[str(s) for s in _SOURCES],
        extra_cflags=cflags,
        extra_ldflags=[f for f in cflags if f in _OPENMP],
        is_python_module=False,
        verbose=False,
    )
    return getattr(torch.ops, name)  # the kernels register themselves as torch.ops.<name>.*


def _load() -> ModuleType | None:
    """Compile (first use only, then cached in torch's extensions dir) and import the C++ kernels."""
    global _ext, _load_error
    if _ext is not None or _load_error is not None:
        return _ext
    try:
        try:
            _ext = _build(_CFLAGS)
        except Exception as e:
            if not _OPENMP:
                raise
            serial = [f for f in _CFLAGS if f not in _OPENMP]
            _ext = _build(serial)
            warnings.warn(
                f"seqvision: the fused BiLSTM2D engine was built without OpenMP (the compiler refused it: "
                f"{type(e).__name__}); its recurrences run on one thread",
                RuntimeWarning,
                stacklevel=2,
            )
    except Exception as e:  # no compiler, no ninja, build error: fall back to the reference path
        _load_error = f"{type(e).__name__}: {e}"
        warnings.warn(
            f"seqvision: the fused BiLSTM2D engine could not be built, using the reference path ({_load_error})",
            RuntimeWarning,
            stacklevel=2,
        )
    return _ext


_bf16_recurrence = os.environ.get("SEQVISION_BF16_RECURRENCE", "") not in ("", "0")


def bf16_recurrence() -> bool:
    """Whether bf16 calls give the recurrent products bf16 operands (h and W_hh rounded, fp32 accumulation)
    instead of fp32 ones: SEQVISION_BF16_RECURRENCE set to anything but "" or "0" at import, or
    ``set_bf16_recurrence``. Off by default: which one is faster depends on the CPU's matrix units."""
    return _bf16_recurrence


def set_bf16_recurrence(enabled: bool) -> None:
    """Choose the precision of the recurrent products of bf16 calls from now on (see ``bf16_recurrence``)."""
    global _bf16_recurrence
    _bf16_recurrence = bool(enabled)


@contextlib.contextmanager
def use_bf16_recurrence(enabled: bool) -> Iterator[None]:
    """Context manager form of ``set_bf16_recurrence``; restores the previous choice on exit."""
    previous = _bf16_recurrence
    set_bf16_recurrence(enabled)
    try:
        yield
    finally:
        set_bf16_recurrence(previous)


def bf16_recurrence_kernel() -> str:
    """What runs the bf16 recurrent products here: "amx" (oneDNN's batch-reduce GEMM ukernel on the AMX tiles,
    weights packed for them once per call) or "gemm" (ATen's bf16 GEMM: correct everywhere, not faster than the
    fp32 products); builds the engine if needed."""
    return str(_require().bf16_recurrence_kernel())


def disabled_by_env() -> bool:
    """True when SEQVISION_NO_FUSED is set to anything but "" or "0"."""
    return os.environ.get("SEQVISION_NO_FUSED", "") not in ("", "0")


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the fused engine can run here (builds it on the first call; one warning if that fails)."""
    return not disabled_by_env() and _load() is not None


def parallel_threads() -> int:
    """Threads one parallel region of the compiled kernels runs on (``torch.get_num_threads()`` when the build
    has OpenMP, 1 when it does not); builds the engine if needed."""
    return int(_require().parallel_threads())


def images_per_chunk(batch: int, height: int, width: int, proj_bytes_per_token: int) -> int:
    """Images the forward kernel projects and runs at a time (its workspace holds one chunk's input
    projections, ``proj_bytes_per_token`` per token); builds the engine if needed."""
    return int(_require().images_per_chunk(batch, height, width, proj_bytes_per_token))


def load_error() -> str | None:
    """Why the build failed, or None."""
    return _load_error


def _require() -> ModuleType:
    ext = _load()
    if ext is None:
        raise RuntimeError(f"the fused BiLSTM2D engine is not available: {_load_error}")
    return ext


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- Custom ops ----------------------------------------------------------------------------------------------
# Directions: n_v vertical then n_h horizontal (each 0, 1 = forward or 2 = forward + backward); the output
# columns follow that order: [vertical fwd | vertical bwd | horizontal fwd | horizontal bwd].
# cell: "lstm" (G = 4 gate blocks), "gru" (3) or "rnn" (tanh, 1), as in reference.CELL_NAMES.
# w_ih: ndir*G*D x C; bias: ndir*G*D (packed_weights': b_ih + b_hh in the acc dtype, except the GRU's n blocks:
# b_in alone); bias_hn: the GRU's b_hn (ndir*D), else empty; w_hh: ndir x G*D x D.
_SAVED = {"lstm": 4, "gru": 5, "rnn": 1}  # acc values saved per token, direction and hidden unit


@torch.library.custom_op("seqvision::rnn2d_fused", mutates_args=())
def rnn2d_op(
    x: Tensor,
    w_ih: Tensor,
    bias: Tensor,
    bias_hn: Tensor,
    w_hh: Tensor,
    cell: str,
    n_v: int,
    n_h: int,
    save: bool,
    bf16_recurrence: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused RNN2D forward: (out B x H x W x ndir*D, gates, cells); gates / cells are empty unless ``save``
    (cells: LSTM only). ``bf16_recurrence``: bf16 operands for the recurrent products of a bf16 ``x``."""
    out, gates, cells = _require().rnn2d_forward(x, w_ih, bias, bias_hn, w_hh, cell, n_v, n_h, save, bf16_recurrence)
    return out, gates, cells


@rnn2d_op.register_fake
def _(x, w_ih, bias, bias_hn, w_hh, cell, n_v, n_h, save, bf16_recurrence=False):
    B, H, W, _ = x.shape
    nd, D = n_v + n_h, w_hh.shape[2]
    acc = _acc_dtype(x.dtype)
    gates = x.new_empty(B, H, W, nd, _SAVED[cell] * D, dtype=acc) if save else x.new_empty(0, dtype=acc)
    cells = x.new_empty(B, H, W, nd, D, dtype=acc) if save and cell == "lstm" else x.new_empty(0, dtype=acc)
    return x.new_empty(B, H, W, nd * D), gates, cells


@torch.library.custom_op("seqvision::rnn2d_fused_backward", mutates_args=())
def rnn2d_op_backward(
    grad: Tensor,
    x: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    out: Tensor,
    gates: Tensor,
    cells: Tensor,
    cell: str,
    n_v: int,
    n_h: int,
    bf16_recurrence: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx, dw_ih, dbias, dbias_hn, dw_hh) of ``rnn2d_op``'s output from what its forward saved."""
    grads = _require().rnn2d_backward(grad, x, w_ih, w_hh, out, gates, cells, cell, n_v, n_h, bf16_recurrence)
    dx, dw_ih, dbias, dbias_hn, dw_hh = grads
    return dx, dw_ih, dbias, dbias_hn, dw_hh


@rnn2d_op_backward.register_fake
def _(grad, x, w_ih, w_hh, out, gates, cells, cell, n_v, n_h, bf16_recurrence=False):
    acc = _acc_dtype(x.dtype)
    dbias = x.new_empty(w_ih.shape[0], dtype=acc)
    dbias_hn = x.new_empty((n_v + n_h) * w_hh.shape[2] if cell == "gru" else 0, dtype=acc)
    return torch.empty_like(x), torch.empty_like(w_ih), dbias, dbias_hn, torch.empty_like(w_hh)


def _setup_context(ctx, inputs, output):
    x, w_ih, bias, bias_hn, w_hh, cell, n_v, n_h, save, *rest = inputs
    out, gates, cells = output
    ctx.mark_non_differentiable(gates, cells)
    ctx.save_for_backward(x, w_ih, w_hh, out, gates, cells)
    ctx.cell, ctx.n_v, ctx.n_h, ctx.save = cell, n_v, n_h, save
    ctx.bf16_recurrence = bool(rest[0]) if rest else False
    ctx.bias_dtype, ctx.bias_hn_dtype = bias.dtype, bias_hn.dtype


def _backward(ctx, grad, _grad_gates, _grad_cells):
    if not ctx.save:
        raise RuntimeError("seqvision::rnn2d_fused was run with save=False; its output has no gradient")
    x, w_ih, w_hh, out, gates, cells = ctx.saved_tensors
    dx, dw_ih, dbias, dbias_hn, dw_hh = rnn2d_op_backward(
        grad.contiguous(), x, w_ih, w_hh, out, gates, cells, ctx.cell, ctx.n_v, ctx.n_h, ctx.bf16_recurrence
    )
    return dx, dw_ih, dbias.to(ctx.bias_dtype), dbias_hn.to(ctx.bias_hn_dtype), dw_hh, None, None, None, None, None


rnn2d_op.register_autograd(_backward, setup_context=_setup_context)


# -- Entry point used by seqvision.ops.rnn2d -------------------------------------------------------------------
_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _compute_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype the op runs in: bf16 under CPU bf16 autocast (as nn.LSTM would), else x's own dtype."""
    if torch.is_autocast_enabled("cpu") and x.dtype in (torch.float32, torch.bfloat16):
        return torch.bfloat16 if torch.get_autocast_dtype("cpu") == torch.bfloat16 else None
    return x.dtype if x.dtype in _SUPPORTED_DTYPES else None


def _supported(rnns: list[nn.RNNBase], x: Tensor) -> bool:
    first = rnns[0]
    for r in rnns:
        if type(r) is not type(first) or type(r) not in CELL_NAMES or getattr(r, "nonlinearity", "tanh") != "tanh":
            return False
        if r.num_layers != 1 or not r.batch_first or r.proj_size != 0:
            return False
        if r.hidden_size != first.hidden_size or r.bidirectional != first.bidirectional or r.bias != first.bias:
            return False
        if r.input_size != x.shape[-1]:
            return False
    return True


def rnn2d_fused(x: Tensor, rnn_v: nn.RNNBase | None, rnn_h: nn.RNNBase | None, union: str) -> Tensor | None:
    """``rnn2d_reference(x, rnn_v, rnn_h, union)`` with the fused kernels, or None where they do not apply."""
    rnns = [r for r in (rnn_v, rnn_h) if r is not None]
    if not rnns or x.dim() != 4 or x.device.type != "cpu" or x.numel() == 0 or not _supported(rnns, x):
        return None
    dtype = _compute_dtype(x)
    if dtype is None:
        return None
    cell = CELL_NAMES[type(rnns[0])]
    dirs = 2 if rnns[0].bidirectional else 1
    n_v = dirs if rnn_v is not None else 0
    n_h = dirs if rnn_h is not None else 0
    save = records_grad(x, rnns)
    acc = _acc_dtype(dtype)
    w_ih, bias, w_hh = packed_weights(rnns, dtype, acc)
    bias_hn = gru_hn_bias(rnns, acc) if cell == "gru" else w_ih.new_zeros(0, dtype=acc)
    if bias is None:  # the kernel always adds the biases
        bias = w_ih.new_zeros(w_ih.shape[0], dtype=acc)
        if cell == "gru":
            bias_hn = w_ih.new_zeros(len(rnns) * dirs * rnns[0].hidden_size, dtype=acc)
    bf16_rec = dtype == torch.bfloat16 and _bf16_recurrence
    out, _, _ = rnn2d_op(x.to(dtype).contiguous(), w_ih, bias, bias_hn, w_hh, cell, n_v, n_h, save, bf16_rec)
    if n_v and n_h and union != "cat":  # the reference joins two axes by addition unless union == "cat"
        half = out.shape[-1] // 2
        out = out[..., :half] + out[..., half:]
    return out
