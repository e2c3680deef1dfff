"""Reference BiLSTM2D token mixing built on torch's nn.LSTM / nn.GRU / nn.RNN.

This is the path the authors' code and timm's port take: the vertical RNN reads every column
(sequences of length H, batch B*W), the horizontal RNN reads every row (length W, batch B*H).
It is kept as the ground truth for the fused engine and as its fallback.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

UNIONS = ("cat", "add", "vertical", "horizontal")


# Set on the first CPU-autocast call that oneDNN refuses; later calls go straight to ATen's kernel.
_onednn_lacks_bf16_rnn = False


def _call(rnn: nn.RNNBase, seq: Tensor) -> Tensor:
    """``rnn(seq)[0]``; where oneDNN has no bf16 RNN primitive (CPUs without AVX512-BF16) an autocast call
    fails inside oneDNN, so it runs on ATen's native kernel instead, cast to the autocast dtype."""
    global _onednn_lacks_bf16_rnn
    if not (seq.device.type == "cpu" and torch.is_autocast_enabled("cpu")):
        return rnn(seq)[0]
    if not _onednn_lacks_bf16_rnn:
        try:
            return rnn(seq)[0]
        except RuntimeError as e:
            if "primitive descriptor" not in str(e):
                raise
            _onednn_lacks_bf16_rnn = True
    with torch.backends.mkldnn.flags(enabled=False):
        out = rnn(seq)[0]
    return out.to(torch.get_autocast_dtype("cpu"))


# The sequence layouts of the two axes, shared with the models' TorchScript path.
def columns(x: Tensor) -> Tensor:
    """B x H x W x C -> (B*W) x H x C: every column as one sequence, top to bottom."""
    B, H, W, C = x.shape
    return x.transpose(1, 2).reshape(B * W, H, C)


def from_columns(y: Tensor, B: int, H: int, W: int) -> Tensor:
    """The inverse of ``columns`` for the RNN's output: (B*W) x H x D -> B x H x W x D."""
    return y.reshape(B, W, H, y.shape[-1]).transpose(1, 2)  # not -1: B may be 0


def rows(x: Tensor) -> Tensor:
    """B x H x W x C -> (B*H) x W x C: every row as one sequence, left to right."""
    B, H, W, C = x.shape
    return x.reshape(B * H, W, C)


def from_rows(y: Tensor, B: int, H: int, W: int) -> Tensor:
    """The inverse of ``rows`` for the RNN's output: (B*H) x W x D -> B x H x W x D."""
    return y.reshape(B, H, W, y.shape[-1])


def run_vertical(x: Tensor, rnn: nn.RNNBase) -> Tensor:
    """Run ``rnn`` down every column of a B x H x W x C map; returns B x H x W x (dirs * D)."""
    B, H, W, _ = x.shape
    return from_columns(_call(rnn, columns(x)), B, H, W)


def run_horizontal(x: Tensor, rnn: nn.RNNBase) -> Tensor:
    """Run ``rnn`` along every row of a B x H x W x C map; returns B x H x W x (dirs * D)."""
    B, H, W, _ = x.shape
    return from_rows(_call(rnn, rows(x)), B, H, W)


def join(v: Tensor | None, h: Tensor | None, union: str) -> Tensor:
    """Combine the vertical and horizontal outputs (Sec. 3.2: "cat" in the paper, "add" as ablation)."""
    if v is not None and h is not None:
        return torch.cat([v, h], dim=-1) if union == "cat" else v + h
    out = v if v is not None else h
    assert out is not None, "at least one of the vertical / horizontal RNNs must exist"
    return out


def rnn2d_reference(x: Tensor, rnn_v: nn.RNNBase | None, rnn_h: nn.RNNBase | None, union: str) -> Tensor:
    """BiLSTM2D without the channel-fusion fc: B x H x W x C -> B x H x W x C_out."""
    v = run_vertical(x, rnn_v) if rnn_v is not None else None
    h = run_horizontal(x, rnn_h) if rnn_h is not None else None
    return join(v, h, union)


# -- The same computation as one opaque op, for torch.export and torch.compile ---------------------------------
# Exporting or compiling nn.LSTM unrolls its time loop, which fixes H and W and makes compilation slow; as a
# custom op the recurrence stays one node with symbolic shapes. Its backward is a second opaque op that
# recomputes the forward under autograd (the reference path is for checking and fallback, not for speed).
_CELL_FN = {"lstm": torch.lstm, "gru": torch.gru, "rnn": torch.rnn_tanh}
CELL_NAMES = {nn.LSTM: "lstm", nn.GRU: "gru", nn.RNN: "rnn"}


def _run_functional(seq: Tensor, weights: list[Tensor], cell: str, hidden: int, bidirectional: bool) -> Tensor:
    dirs = 2 if bidirectional else 1
    h0 = seq.new_zeros(dirs, seq.shape[0], hidden)
    hx = (h0, h0) if cell == "lstm" else h0
    return _CELL_FN[cell](seq, hx, weights, True, 1, 0.0, False, bidirectional, True)[0]


def _rnn2d_functional(x, weights_v, weights_h, cell, hidden, bidirectional, union) -> Tensor:
    B, H, W, C = x.shape
    v = h = None
    if weights_v:
        v = _run_functional(x.transpose(1, 2).reshape(B * W, H, C), weights_v, cell, hidden, bidirectional)
        v = v.reshape(B, W, H, v.shape[-1]).transpose(1, 2)
    if weights_h:
        h = _run_functional(x.reshape(B * H, W, C), weights_h, cell, hidden, bidirectional)
        h = h.reshape(B, H, W, h.shape[-1])
    return join(v, h, union).contiguous()


@torch.library.custom_op("seqvision::rnn2d_reference", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def rnn2d_reference_op(
    x: Tensor, weights_v: list[Tensor], weights_h: list[Tensor], cell: str, hidden: int, bidirectional: bool, union: str
) -> Tensor:
    """``rnn2d_reference`` on flat weight lists (w_ih, w_hh, b_ih, b_hh per direction); [] = axis absent."""
    return _rnn2d_functional(x, weights_v, weights_h, cell, hidden, bidirectional, union)


@rnn2d_reference_op.register_fake
def _(x, weights_v, weights_h, cell, hidden, bidirectional, union):
    per_axis = hidden * (2 if bidirectional else 1)
    axes = (1 if weights_v else 0) + (1 if weights_h else 0)
    return x.new_empty(*x.shape[:-1], per_axis * axes if union == "cat" else per_axis)


@torch.library.custom_op("seqvision::rnn2d_reference_backward", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def _rnn2d_reference_backward(
    grad: Tensor,
    x: Tensor,
    weights_v: list[Tensor],
    weights_h: list[Tensor],
    cell: str,
    hidden: int,
    bidirectional: bool,
    union: str,
) -> list[Tensor]:
    # Autograd is switched off inside an op's kernel; torch.func's transform brings its own.
    nv = len(weights_v)

    def forward(x, *w):
        return _rnn2d_functional(x, list(w[:nv]), list(w[nv:]), cell, hidden, bidirectional, union)

    # oneDNN's RNN backward does not run under torch.func; the native kernels give the same gradients.
    with torch.backends.mkldnn.flags(enabled=False):
        _, vjp = torch.func.vjp(forward, x, *weights_v, *weights_h)
        return [g.contiguous() for g in vjp(grad)]


@_rnn2d_reference_backward.register_fake
def _(grad, x, weights_v, weights_h, cell, hidden, bidirectional, union):
    return [t.new_empty(t.shape) for t in (x, *weights_v, *weights_h)]


def _setup_context(ctx, inputs, output):
    x, weights_v, weights_h, *config = inputs
    ctx.save_for_backward(x, *weights_v, *weights_h)
    ctx.n_v, ctx.config = len(weights_v), config


def _backward(ctx, grad):
    x, *weights = ctx.saved_tensors
    wv, wh = weights[: ctx.n_v], weights[ctx.n_v :]
    grads = _rnn2d_reference_backward(grad.contiguous(), x, wv, wh, *ctx.config)
    return grads[0], grads[1 : 1 + ctx.n_v], grads[1 + ctx.n_v :], None, None, None, None


rnn2d_reference_op.register_autograd(_backward, setup_context=_setup_context)


def rnn2d_traceable(x: Tensor, rnn_v: nn.RNNBase | None, rnn_h: nn.RNNBase | None, union: str) -> Tensor:
    """The reference computation as one op (what torch.export and torch.compile see), with autograd."""
    rnn = rnn_v if rnn_v is not None else rnn_h
    assert rnn is not None
    return rnn2d_reference_op(
        x,
        list(rnn_v._flat_weights) if rnn_v is not None else [],
        list(rnn_h._flat_weights) if rnn_h is not None else [],
        CELL_NAMES[type(rnn)],
        rnn.hidden_size,
        rnn.bidirectional,
        union,
    )
