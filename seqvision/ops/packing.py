"""The RNN weights of a BiLSTM2D block, packed for the engines that run every direction at once.

The fused (CPU) and Triton (GPU) engines both want the directions' weights side by side, in the order of the
block's output slices [vertical fwd | vertical bwd | horizontal fwd | horizontal bwd]: one input-projection
matrix for all directions, the summed biases, and the recurrent matrices stacked (the GRU's biases, which
do not all sum, come from ``gru_biases``).

Packing runs on every call, inference included: a few small copies per block (0.17-0.21 ms on 2 CPU cores at
Sequencer2D-S's shapes, under 1% of a mixer's time; on a GPU a dozen small kernels).
A cache across calls was tried and removed: it can only see weight changes that bump the parameters' version
counters, and in-place updates through ``.data`` (old-style optimizers, hand-written EMA) do not, so it could
silently serve stale weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def packed_weights(
    rnns: list[nn.RNNBase], dtype: torch.dtype, bias_dtype: torch.dtype
) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(W_ih, b, W_hh)``: every direction's ``weight_ih`` concatenated (dirs*4D x C) in ``dtype``,
    ``b_ih + b_hh`` concatenated in ``bias_dtype`` (summed in the wider of that and the parameters' dtype; None
    without biases), and the ``weight_hh`` stacked (dirs x 4D x D) in ``dtype``. Differentiable: gradients
    reach every nn.LSTM parameter."""
    suffixes = ("", "_reverse") if rnns[0].bidirectional else ("",)
    names = [(r, s) for r in rnns for s in suffixes]
    w_ih = torch.cat([getattr(r, f"weight_ih_l0{s}") for r, s in names]).to(dtype)
    w_hh = torch.stack([getattr(r, f"weight_hh_l0{s}") for r, s in names]).to(dtype)
    if not rnns[0].bias:
        return w_ih, None, w_hh
    sums = []
    for r, s in names:
        b_ih, b_hh = getattr(r, f"bias_ih_l0{s}"), getattr(r, f"bias_hh_l0{s}")
        acc = torch.promote_types(b_ih.dtype, bias_dtype)
        sums.append(b_ih.to(acc) + b_hh.to(acc))
    return w_ih, torch.cat(sums).to(bias_dtype), w_hh


def gru_biases(rnns: list[nn.RNNBase], bias_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A GRU's biases as the fused kernel adds them: ``b_ih + b_hh`` for the r and z blocks and ``b_in`` alone
    for the n block (dirs*3D), and ``b_hn`` (dirs*D), which acts inside r * (W_hn h + b_hn). Differentiable."""
    suffixes = ("", "_reverse") if rnns[0].bidirectional else ("",)
    outer, inner = [], []
    for r in rnns:
        D = r.hidden_size
        for s in suffixes:
            b_ih = getattr(r, f"bias_ih_l0{s}").to(bias_dtype)
            b_hh = getattr(r, f"bias_hh_l0{s}").to(bias_dtype)
            outer += [b_ih[: 2 * D] + b_hh[: 2 * D], b_ih[2 * D :]]
            inner.append(b_hh[2 * D :])
    return torch.cat(outer), torch.cat(inner)
