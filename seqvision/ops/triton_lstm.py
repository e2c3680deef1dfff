"""GPU engine for BiLSTM2D: the LSTM recurrences of all directions of a block in one persistent Triton launch.

Split of the work:

- torch does the large GEMMs: the input projections of every direction as one ``F.linear`` (weights of the
  directions concatenated, ``b_ih + b_hh`` folded into its bias), and later the block's fc. Under AMP these run
  in bf16/fp16 on tensor cores like any other linear layer, and autograd handles x, ``W_ih`` and the biases.
- Triton does only the recurrence, ``seqvision::rnn2d_triton``: program (direction, tile of sequences) walks the
  time steps, adds ``h_{t-1} @ W_hh^T`` (``tl.dot``) to the precomputed projection, applies the gate
  nonlinearities and the cell update (fp32 cell state, whatever the input dtype) and writes ``h_t`` straight
  into the B x H x W x (dirs * D) output, so no transposes or copies of the vertical direction are needed.
- The backward kernel runs the same tiles in reverse time from the saved gate activations and fp32 cell
  states and produces the gradient of the projections (``dgx``; torch's autograd turns it into dx, dW_ih, db).
  ``dW_hh = sum_t dz_t^T h_{t-1}`` is then one torch GEMM per direction over all positions (tensor cores,
  deterministic, no atomics; accumulating it in the kernel would not fit in registers at D = 96).

Covered: nn.LSTM, one layer, batch_first, no projection, bidirectional or not, any union ("cat", "add",
one axis only), bf16 / fp16 (fp32 cell state) and fp32; on a GPU hidden size <= 128 (<= 64 in fp32), which
includes every Sequencer2D variant but sequencer2d_s_h2x's wider stages. Anything else (GRU, tanh RNN, two axes
with different hidden sizes ...) returns None so the dispatcher falls back to cuDNN via nn.LSTM. The kernels
keep W_hh on chip. Held as one piece padded to a power of two, D = 96 (padded to 128) needs more shared memory
per block than some GPUs have; there the first use finds out and switches to the hidden state split in two
pieces (64 + 32), see ``_candidates`` and ``benchmarks/triton_resources.py``.

Triton is imported lazily: a CPU-only install without triton imports seqvision fine. For CPU testing set
``TRITON_INTERPRET=1`` (before triton is imported) and ``SEQVISION_TRITON_INTERPRET=1``; the kernels then run
in Triton's interpreter on CPU tensors.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import EngineUnavailableError
from .packing import packed_weights, records_grad

# Direction codes: bit 1 = axis (0 vertical: down the columns, 1 horizontal: along the rows), bit 0 = reversed.
# Up to 4 directions are packed 2 bits each into one int kernel argument (``dir_codes``).
V_FWD, V_BWD, H_FWD, H_BWD = 0, 1, 2, 3


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("SEQVISION_TRITON_INTERPRET") == "1"


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install (e.g. no driver libraries)
        return False
    return True


def available(x: Tensor) -> bool:
    """Whether the Triton engine can run on ``x``: a CUDA tensor with triton installed, or (for testing on a
    CPU-only machine) ``TRITON_INTERPRET=1`` and ``SEQVISION_TRITON_INTERPRET=1`` set in the environment."""
    if x.is_cuda:
        return _triton_importable()
    return x.device.type == "cpu" and _interpret_requested() and _triton_importable()


# -- Kernels ---------------------------------------------------------------------------------------------------
@functools.cache
def _kernels():
    """``(forward kernel, backward kernel)``, imported on first use so that this module never needs triton."""
    from . import _triton_kernels as k

    return k.lstm2d_fwd_kernel, k.lstm2d_bwd_kernel


# -- Launch configuration --------------------------------------------------------------------------------------
def block_size(n: int) -> int:
    """``n`` padded to a power of two, at least 16 (tl.dot's smallest operand); masks hide the padding."""
    return max(16, 1 << (n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """``a / b`` rounded up: how many blocks of ``b`` cover ``a`` (grid sizes)."""
    return -(-a // b)


def pieces(D: int, split: bool) -> tuple[int, int]:
    """``(BLOCK_A, BLOCK_B)``: the widths the kernels hold the hidden state in. One piece is D padded to a power
    of two (BLOCK_B = 0); split, it is the largest power of two below that and the padded rest, so that W_hh is
    held without padding: 96 -> 64 + 32, 48 -> 32 + 16. Only split where that saves padding (not D = 64)."""
    whole = block_size(D)
    if not split or whole == D or D <= 16:
        return whole, 0
    return whole // 2, block_size(D - whole // 2)


def _candidates(D: int, dtype: torch.dtype, device: torch.device) -> list[dict]:
    """Launch settings to try, best first: the first one that compiles and launches on the device is used.

    The GPU defaults are the fastest of ``benchmarks/bench_triton_op.py``'s sweep (benchmarks/RESULTS.md): the
    hidden state in one padded piece, 16 sequences per program, 8 warps, prefetch on. Where the padded W_hh does
    not fit a block's shared memory, the second candidate, the hidden state in two unpadded pieces, runs
    instead. ``SEQVISION_TRITON_TUNE`` replaces the list with one setting (see ``_tuned``). num_stages=1: the
    time loop is serial.
    """
    block_d = block_size(D)
    if device.type == "cpu":  # the interpreter: smallest legal tiles are the fastest to emulate
        return [dict(BLOCK_N=16, BLOCK_A=block_d, BLOCK_B=0, num_warps=1, PREFETCH=True)]
    tuned = _tuned().get(block_d)
    if tuned is not None:
        block_a, block_b = pieces(D, tuned["split"])
        settings = {k: v for k, v in tuned.items() if k != "split"}
        return [dict(BLOCK_A=block_a, BLOCK_B=block_b, num_stages=1, **settings)]
    out = [dict(BLOCK_N=16, BLOCK_A=block_d, BLOCK_B=0, num_warps=8, num_stages=1, PREFETCH=True)]
    block_a, block_b = pieces(D, split=True)
    if block_b:
        out.append(dict(BLOCK_N=16, BLOCK_A=block_a, BLOCK_B=block_b, num_warps=8, num_stages=1, PREFETCH=True))
    return out


# (device, dtype, D) -> the candidate taken where the first one could not launch (see ``_launch``), and the
# settings the kernels last launched with (for reports).
_CHOSEN: dict[tuple, dict] = {}
_LAUNCHED: dict[tuple, dict] = {}


def _ordered_candidates(D: int, dtype: torch.dtype, device: torch.device) -> list[dict]:
    """``_candidates`` in the order to try them: the one a fallback settled on for this device first, then the
    rest (with ``SEQVISION_TRITON_TUNE`` set its setting is the only candidate, so a remembered one is ignored)."""
    candidates = _candidates(D, dtype, device)
    chosen = _CHOSEN.get((str(device), dtype, D))
    return [chosen] + [c for c in candidates if c != chosen] if chosen in candidates else candidates


def _config(D: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The launch settings to try first."""
    return _ordered_candidates(D, dtype, device)[0]


def _launch(kernel, ndir: int, sequences: int, D: int, dtype: torch.dtype, device: torch.device, *args, **kw):
    """``kernel`` over (directions, tiles of sequences) with ``_config``'s settings; where those need more of the
    GPU than it has (Triton raises OutOfResources before launching anything), the next candidate, which is then
    remembered for this device. Selection happens here, at run time, so that it also works inside graphs that
    torch.compile traced before any eager call (where nothing could be tried)."""
    from triton.runtime.errors import OutOfResources

    key = (str(device), dtype, D)
    ordered = _ordered_candidates(D, dtype, device)
    error = None
    for cfg in ordered:
        try:
            kernel[(ndir, cdiv(sequences, cfg["BLOCK_N"]))](*args, **kw, **cfg)
        except OutOfResources as e:
            error = e
            continue
        if cfg is not ordered[0]:
            _CHOSEN[key] = cfg
        _LAUNCHED[key] = cfg
        return
    # Eager use never gets here (the first-use trial falls back to cuDNN); a graph traced before any eager call can.
    raise EngineUnavailableError(
        f"the Triton BiLSTM2D kernels do not fit this GPU at hidden size {D} ({error}); run the model once "
        "outside torch.compile first (it then uses cuDNN for these layers), or use set_engine('reference')"
    ) from error


def chosen_settings(device: torch.device | str) -> dict[str, str]:
    """The settings the kernels last launched with on ``device``, for reports: ``{"torch.bfloat16, D=96": "hidden
    state split 64 + 32, 16 sequences x 8 warps, prefetch"}`` (empty before any launch)."""
    want = torch.device(device)
    out = {}
    for (dev, dtype, D), cfg in sorted(_LAUNCHED.items(), key=lambda kv: (str(kv[0][1]), kv[0][2])):
        dev = torch.device(dev)
        if dev.type != want.type or want.index not in (None, dev.index):  # "cuda" matches "cuda:0"
            continue
        a, b = cfg["BLOCK_A"], cfg["BLOCK_B"]
        layout = f"hidden state split {a} + {b}" if b else f"hidden state in one piece of {a}"
        prefetch = ", prefetch" if cfg["PREFETCH"] else ""
        out[f"{dtype}, D={D}"] = f"{layout}, {cfg['BLOCK_N']} sequences x {cfg['num_warps']} warps{prefetch}"
    return out


def _tuned() -> dict[int, dict]:
    """Launch settings from ``SEQVISION_TRITON_TUNE``: comma-separated ``BLOCK_D:BLOCK_N:num_warps:prefetch[:split]``
    entries, e.g. ``64:32:8:1,128:16:8:1:1`` (for tuning runs; split defaults to 0; a malformed entry raises
    ValueError)."""
    spec = os.environ.get("SEQVISION_TRITON_TUNE", "").strip()
    out = {}
    for item in filter(None, (i.strip() for i in spec.split(","))):
        try:
            values = [int(v) for v in item.split(":")]
            block_d, block_n, warps, prefetch = values[:4]
            (split,) = values[4:] or [0]
        except ValueError:
            raise ValueError(
                f"SEQVISION_TRITON_TUNE entry {item!r}: expected BLOCK_D:BLOCK_N:num_warps:prefetch[:split], "
                "e.g. 128:16:8:1"
            ) from None
        out[block_d] = dict(BLOCK_N=block_n, num_warps=warps, PREFETCH=bool(prefetch), split=bool(split))
    return out


def _fits_gpu(D: int, dtype: torch.dtype) -> bool:
    """Whether the kernels can fit one SM at this hidden size (W_hh is held on chip): 16-bit D <= 128 and fp32
    D <= 64. fp32 at D = 96 stays on cuDNN: W_hh alone is 144 KiB there even split (over 227 KiB padded, ptxas),
    more than any consumer GPU has, and the exact-fp32 kernel was never timed against cuDNN's TF32 one."""
    return block_size(D) <= (64 if dtype == torch.float32 else 128)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (TF32 would break parity with the reference at 1e-5);
    # 16-bit inputs: tensor-core products with fp32 accumulation.
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast_dot(t: Tensor) -> bool:
    # Triton's interpreter multiplies the raw bits of bf16 tensors in tl.dot; on a GPU the dot stays bf16.
    return t.device.type == "cpu" and t.dtype == torch.bfloat16


def _pack_dirs(dirs: list[int]) -> int:
    code = 0
    for k, d in enumerate(dirs):
        code |= d << (2 * k)
    return code


def _check(gx: Tensor, w_hh: Tensor, dirs: list[int]) -> tuple[int, int, int, int, int]:
    B, H, W, G = gx.shape
    ndir, four_d, D = w_hh.shape
    if not (1 <= ndir <= 4 and len(dirs) == ndir and four_d == 4 * D and G == ndir * 4 * D):
        raise ValueError(f"rnn2d_triton: gx {tuple(gx.shape)}, w_hh {tuple(w_hh.shape)} and dirs {dirs} disagree")
    return B, H, W, D, ndir


# -- The recurrence as custom ops (one node for torch.compile / export, with autograd) -------------------------
@torch.library.custom_op("seqvision::rnn2d_triton", mutates_args=())
def rnn2d_triton_op(gx: Tensor, w_hh: Tensor, dirs: list[int], save: bool) -> tuple[Tensor, Tensor, Tensor]:
    """LSTM recurrences over a B x H x W x (ndir*4D) map of input projections (biases included).

    ``w_hh``: ndir x 4D x D, ``dirs``: a direction code per slice (V_FWD, V_BWD, H_FWD, H_BWD). Returns
    ``(y, gates, c)``: y is B x H x W x (ndir*D) in gx's dtype; gate activations (like gx) and fp32 cell
    states (like y) are saved for the backward when ``save`` (else empty).
    """
    B, H, W, D, ndir = _check(gx, w_hh, dirs)
    gx = gx.contiguous()
    w_hh = w_hh.to(gx.dtype).contiguous()
    y = gx.new_empty(B, H, W, ndir * D)
    gates = torch.empty_like(gx) if save else gx.new_empty(0)
    c = gx.new_empty(B, H, W, ndir * D, dtype=torch.float32) if save else gx.new_empty(0, dtype=torch.float32)
    if y.numel() == 0:
        return y, gates, c
    _launch(
        _kernels()[0],
        ndir,
        B * max(H, W),
        D,
        gx.dtype,
        gx.device,
        gx,
        w_hh,
        y,
        gates if save else gx,  # placeholders when not saving: SAVE=False never writes them
        c if save else y,
        B,
        H,
        W,
        D,
        NDIR=ndir,
        dir_codes=_pack_dirs(dirs),
        SAVE=save,
        PRECISION=_precision(gx.dtype),
        UPCAST_DOT=_upcast_dot(gx),
    )
    return y, gates, c


@rnn2d_triton_op.register_fake
def _(gx, w_hh, dirs, save):
    B, H, W, D, ndir = _check(gx, w_hh, dirs)
    y = gx.new_empty(B, H, W, ndir * D)
    if not save:
        return y, gx.new_empty(0), gx.new_empty(0, dtype=torch.float32)
    return y, torch.empty_like(gx), gx.new_empty(B, H, W, ndir * D, dtype=torch.float32)


@torch.library.custom_op("seqvision::rnn2d_triton_backward", mutates_args=())
def rnn2d_triton_backward_op(
    dy: Tensor, gates: Tensor, c: Tensor, y: Tensor, w_hh: Tensor, dirs: list[int]
) -> tuple[Tensor, Tensor]:
    """Gradients of ``rnn2d_triton`` with respect to gx and w_hh, from its saved gates, cell states and output."""
    B, H, W, D, ndir = _check(gates, w_hh, dirs)
    w_c = w_hh.to(gates.dtype).contiguous()
    dgx = torch.empty_like(gates)
    if dgx.numel() == 0:
        return dgx, torch.zeros_like(w_hh)
    _launch(
        _kernels()[1],
        ndir,
        B * max(H, W),
        D,
        gates.dtype,
        gates.device,
        dy.contiguous(),
        gates.contiguous(),
        c.contiguous(),
        w_c,
        dgx,
        B,
        H,
        W,
        D,
        NDIR=ndir,
        dir_codes=_pack_dirs(dirs),
        PRECISION=_precision(gates.dtype),
        UPCAST_DOT=_upcast_dot(gates),
    )
    # dW_hh[k] = sum over positions of dz_t^T h_{t-1}: one GEMM per direction with K = B*H*W (tensor cores,
    # deterministic), h_{t-1} being y shifted by one step along the direction (zero at the sequence start).
    dw = torch.empty_like(w_hh)
    for k, code in enumerate(dirs):
        dim, rev = (2 if code >> 1 else 1), code & 1
        yk = y[..., k * D : (k + 1) * D]
        T = yk.shape[dim]
        h_prev = torch.zeros_like(yk)
        if T > 1:
            h_prev.narrow(dim, 1 - rev, T - 1).copy_(yk.narrow(dim, rev, T - 1))
        dz = dgx[..., k * 4 * D : (k + 1) * 4 * D].reshape(-1, 4 * D)
        dw[k] = (dz.t() @ h_prev.reshape(-1, D)).to(w_hh.dtype)
    return dgx, dw


@rnn2d_triton_backward_op.register_fake
def _(dy, gates, c, y, w_hh, dirs):
    return torch.empty_like(gates), torch.empty_like(w_hh)


def _setup_context(ctx, inputs, output):
    gx, w_hh, dirs, save = inputs
    y, gates, c = output
    if not save:  # the wrapper asks for saving whenever gradients are needed
        raise RuntimeError("rnn2d_triton was called with save=False on inputs that require grad")
    ctx.save_for_backward(gates, c, y, w_hh)
    ctx.dirs = dirs
    ctx.mark_non_differentiable(gates, c)


def _backward(ctx, dy, _dgates, _dc):
    gates, c, y, w_hh = ctx.saved_tensors
    dgx, dw = rnn2d_triton_backward_op(dy, gates, c, y, w_hh, ctx.dirs)
    return dgx, dw, None, None


rnn2d_triton_op.register_autograd(_backward, setup_context=_setup_context)


# -- First use on a device: do the kernels compile and launch here? --------------------------------------------
_RUNS_HERE: dict[tuple, bool] = {}


def runs_here(key: tuple, probe: Callable[[], None], what: Callable[[], str]) -> bool:
    """Whether ``probe`` (launching some kernels on a small input) works; tried once per ``key`` and remembered.

    Triton compiles for the GPU it finds: on one without bf16 tensor cores (before sm_80), or with less shared
    memory per block than a kernel needs, the first launch raises.
    Then one warning names ``what()`` and the reason, and the caller keeps using the torch path for ``key``.
    While torch.compile traces or a CUDA graph is captured nothing can be launched: it answers True there, and
    an eager call made before (a warm-up) has settled the question.
    """
    if key in _RUNS_HERE:
        return _RUNS_HERE[key]
    if torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        return True
    try:
        with torch.no_grad():
            probe()
    except Exception as e:  # compilation error, out of resources, unsupported dtype on this GPU ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        warnings.warn(f"seqvision: {what()} cannot run here ({reason}); using the torch path instead", stacklevel=3)
        _RUNS_HERE[key] = False
    else:
        _RUNS_HERE[key] = True
    return _RUNS_HERE[key]


def _recurrence_runs_here(device: torch.device, dtype: torch.dtype, D: int, ndir: int) -> bool:
    """Whether the kernels launch here with some candidate setting (``_launch`` picks which); else False, with
    one warning."""

    def probe() -> None:
        B, H, W = (16, 16, 16) if device.type == "cuda" else (1, 2, 2)  # 16: the specialisation of real shapes
        gx = torch.randn(B, H, W, ndir * 4 * D, device=device, dtype=dtype)
        w = 0.1 * torch.randn(ndir, 4 * D, D, device=device)
        dirs = [V_FWD, V_BWD, H_FWD, H_BWD][:ndir]
        rnn2d_triton_op(gx, w, dirs, False)  # inference kernel
        y, gates, c = rnn2d_triton_op(gx, w, dirs, True)  # training: forward that saves, then backward
        rnn2d_triton_backward_op(torch.ones_like(y), gates, c, y, w, dirs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def what() -> str:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "the Triton interpreter"
        return f"the Triton BiLSTM2D kernels ({name}, {dtype}, hidden size {D})"

    # The tuned settings are part of the key: a sweep that changes them in one process tries each.
    key = ("rnn2d", str(device), dtype, D, ndir, os.environ.get("SEQVISION_TRITON_TUNE", ""))
    return runs_here(key, probe, what)


# -- Entry point used by the dispatcher ------------------------------------------------------------------------
def _supported(rnn: nn.Module) -> bool:
    return type(rnn) is nn.LSTM and rnn.num_layers == 1 and rnn.batch_first and rnn.proj_size == 0


def rnn2d_triton(x: Tensor, rnn_v: nn.RNNBase | None, rnn_h: nn.RNNBase | None, union: str) -> Tensor | None:
    """BiLSTM2D token mixing (no fc) with the Triton recurrence; same contract as ``rnn2d_reference``.

    Returns None where this engine does not cover the configuration (GRU / tanh RNN, several layers, projections,
    two axes with different hidden sizes, directions or biases, on a GPU hidden sizes over 128 (over 64 in fp32), or
    ``available(x)`` is false); the caller then falls back to nn.LSTM (cuDNN on GPU).
    """
    rnns = [(axis, r) for axis, r in ((0, rnn_v), (1, rnn_h)) if r is not None]
    if not rnns or not available(x) or x.dim() != 4 or not all(_supported(r) for _, r in rnns):
        return None
    first = rnns[0][1]
    same = lambda r: (r.hidden_size, r.bidirectional, r.bias) == (first.hidden_size, first.bidirectional, first.bias)
    if not all(same(r) for _, r in rnns):
        return None
    modules = [r for _, r in rnns]
    params = [p for r in modules for p in r._flat_weights]
    if any(p.device != x.device for p in params):
        return None
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    if x.is_cuda and not _fits_gpu(first.hidden_size, dtype):
        return None

    # Direction slices in the output order [vertical fwd | vertical bwd | horizontal fwd | horizontal bwd].
    dirs = [2 * axis + rev for axis, r in rnns for rev in range(2 if r.bidirectional else 1)]
    if not _recurrence_runs_here(x.device, dtype, first.hidden_size, len(dirs)):
        return None

    save = records_grad(x, modules)
    # In the parameters' dtype: autocast casts W_ih and the bias in F.linear, the op casts W_hh.
    param_dtype = first.weight_ih_l0.dtype
    w_ih, bias, w_hh = packed_weights(modules, param_dtype, param_dtype)
    # One GEMM for every direction's input projection, both biases folded in.
    gx = F.linear(x, w_ih, bias)
    y = rnn2d_triton_op(gx, w_hh, dirs, save)[0]

    if len(rnns) == 2 and union != "cat":  # "add": v + h, each ndir/2 * D wide
        half = y.shape[-1] // 2
        return y[..., :half] + y[..., half:]
    return y
