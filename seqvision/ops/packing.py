"""The RNN weights of a BiLSTM2D block, packed for the engines that run every direction at once.

The fused (CPU) and Triton (GPU) engines both want the directions' weights side by side, in the order of the
block's output slices [vertical fwd | vertical bwd | horizontal fwd | horizontal bwd]: one input-projection
matrix for all directions, the summed biases, and the recurrent matrices stacked (the GRU's b_hn, which does
not sum with the others, comes from ``gru_hn_bias``).

Packing runs on every call, inference included: a few small copies per block (0.17-0.21 ms on 2 CPU cores at
Sequencer2D-S's shapes, under 1% of a mixer's time; on a GPU a dozen small kernels).
A cache across calls was tried and removed: it can only see weight changes that bump the parameters' version
counters, and in-place updates through ``.data`` (old-style optimizers, hand-written EMA) do not, so it could
silently serve stale weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _directions(rnns: list[nn.RNNBase]) -> list[tuple[nn.RNNBase, str]]:
    """(module, parameter-name suffix) of every direction, in the output order."""
    suffixes = ("", "_reverse") if rnns[0].bidirectional else ("",)
    return [(r, s) for r in rnns for s in suffixes]


def records_grad(x: Tensor, rnns: list[nn.RNNBase]) -> bool:
    """Whether autograd records a call on ``x`` with these RNNs (training, or gradients for the input only)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for r in rnns for p in r.parameters()))


def packed_weights(
    rnns: list[nn.RNNBase], dtype: torch.dtype, bias_dtype: torch.dtype
) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(W_ih, b, W_hh)``: every direction's ``weight_ih`` concatenated (dirs*GD x C, G gate blocks of D) in
    ``dtype``, the bias added to the pre-activations concatenated in ``bias_dtype`` (``b_ih + b_hh``, summed in
    the wider of that and the parameters' dtype; for a GRU's n block ``b_in`` alone, as ``b_hn`` acts inside
    r * (W_hn h + b_hn): see ``gru_hn_bias``; None without biases), and the ``weight_hh`` stacked (dirs x GD x D)
    in ``dtype``. Differentiable: gradients reach every RNN parameter."""
    names = _directions(rnns)
    w_ih = torch.cat([getattr(r, f"weight_ih_l0{s}") for r, s in names]).to(dtype)
    w_hh = torch.stack([getattr(r, f"weight_hh_l0{s}") for r, s in names]).to(dtype)
    if not rnns[0].bias:
        return w_ih, None, w_hh
    sums = []
    for r, s in names:
        b_ih, b_hh = getattr(r, f"bias_ih_l0{s}"), getattr(r, f"bias_hh_l0{s}")
        acc = torch.promote_types(b_ih.dtype, bias_dtype)
        if isinstance(r, nn.GRU):
            n = 2 * r.hidden_size  # where the n block starts
            sums += [b_ih[:n].to(acc) + b_hh[:n].to(acc), b_ih[n:].to(acc)]
        else:
            sums.append(b_ih.to(acc) + b_hh.to(acc))
    return w_ih, torch.cat(sums).to(bias_dtype), w_hh


def gru_hn_bias(rnns: list[nn.GRU], bias_dtype: torch.dtype) -> Tensor | None:
    """Every direction's ``b_hn`` (dirs*D) in ``bias_dtype``, the GRU bias that acts inside r * (W_hn h + b_hn)
    and so is not part of ``packed_weights``' bias; None without biases. Differentiable."""
    if not rnns[0].bias:
        return None
    return torch.cat([getattr(r, f"bias_hh_l0{s}")[2 * r.hidden_size :] for r, s in _directions(rnns)]).to(bias_dtype)
