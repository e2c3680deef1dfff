"""The LSTM weights of a BiLSTM2D block, packed for the engines that run every direction at once.

The fused (CPU) and Triton (GPU) engines both want the directions' weights side by side, in the order of the
block's output slices [vertical fwd | vertical bwd | horizontal fwd | horizontal bwd]: one input-projection
matrix for all directions, the summed biases, and the recurrent matrices stacked. Packing copies (and under
autocast casts) every LSTM weight, a dozen small kernels per block: in training that is part of the autograd
graph, but inference re-uses the packed weights until a weight changes.
"""

from __future__ import annotations

import weakref

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


# Keyed weakly on the first module; a stamp of every parameter's storage and version counter invalidates an entry
# when weights are replaced or changed in place (load_state_dict, optimizer steps, .to()).
_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def inference_packed_weights(
    rnns: list[nn.RNNBase], dtype: torch.dtype, bias_dtype: torch.dtype
) -> tuple[Tensor, Tensor | None, Tensor]:
    """``packed_weights`` for inference (no autograd graph), computed once and re-used while the weights stay
    the same."""
    key = (tuple(id(r) for r in rnns), dtype, bias_dtype)
    stamp = tuple((p.data_ptr(), p._version) for r in rnns for p in r._flat_weights)
    hit = _cache.get(rnns[0], {}).get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, usable outside inference mode too
        packed = packed_weights(rnns, dtype, bias_dtype)
    _cache.setdefault(rnns[0], {})[key] = (stamp, packed)
    return packed
