"""The RNN weights of a BiLSTM2D block, packed for the engines that run every direction at once.

The fused (CPU) and Triton (GPU) engines both want the directions' weights side by side, in the order of the
block's output slices [vertical fwd | vertical bwd | horizontal fwd | horizontal bwd]: one input-projection
matrix for all directions, the summed biases, and the recurrent matrices stacked (the GRU's b_hn, which does
not sum with the others, comes from ``gru_hn_bias``).

Copying every block's weights into that layout on every call is a measurable share of a small-batch
inference, so the model lays each block's weight_ih and weight_hh back to back in memory when it builds the
block (``share_storage``: every parameter becomes a view of one tensor, with its own name, shape and value), and
where autograd records nothing ``packed_weights`` returns views of that memory instead of copies. Wherever the
parameters do not lie that way (after ``.to(dtype)`` or a deepcopy, on a GPU, in a model built elsewhere) or
gradients are recorded, it concatenates. Views, unlike a cache of copies, cannot serve stale weights after an
in-place update through ``.data``: they are the parameters' memory.
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


def share_storage(rnns: list[nn.RNNBase]) -> None:
    """Lay every direction's ``weight_ih`` back to back in one tensor, in the output order, and the ``weight_hh``
    likewise, so that ``packed_weights`` can view them packed instead of copying them. Each parameter keeps its
    name, shape, value and ``requires_grad``; it becomes a view of the shared tensor. Call it when building."""
    names = _directions(rnns)
    for kind in ("weight_ih", "weight_hh"):
        params = [getattr(r, f"{kind}_l0{s}") for r, s in names]
        packed = torch.cat([p.detach() for p in params])
        for (r, s), p, part in zip(names, params, packed.split([p.shape[0] for p in params]), strict=True):
            setattr(r, f"{kind}_l0{s}", nn.Parameter(part, requires_grad=p.requires_grad))


def _back_to_back(params: list[Tensor], dtype: torch.dtype) -> Tensor | None:
    """``torch.cat(params)`` as a view, without a copy, where they lie back to back in one tensor's memory in
    ``dtype`` (as ``share_storage`` lays them); None where they do not."""
    first = params[0]
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for p in params:
        if p.dtype != dtype or p.device != first.device or p.shape[1:] != first.shape[1:] or not p.is_contiguous():
            return None
        if p.untyped_storage().data_ptr() != storage or p.storage_offset() != offset:
            return None
        offset += p.numel()
    rows = sum(p.shape[0] for p in params)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def packed_weights(
    rnns: list[nn.RNNBase], dtype: torch.dtype, bias_dtype: torch.dtype
) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(W_ih, b, W_hh)``: every direction's ``weight_ih`` concatenated (dirs*GD x C, G gate blocks of D) in
    ``dtype``, the bias added to the pre-activations concatenated in ``bias_dtype`` (``b_ih + b_hh``, summed in
    the wider of that and the parameters' dtype; for a GRU's n block ``b_in`` alone, as ``b_hn`` acts inside
    r * (W_hn h + b_hn): see ``gru_hn_bias``; None without biases), and the ``weight_hh`` stacked (dirs x GD x D)
    in ``dtype``. Differentiable: gradients reach every RNN parameter. Where autograd records nothing for the
    weights, W_ih and W_hh are views of the parameters' memory if ``share_storage`` laid them out (no copy)."""
    names = _directions(rnns)
    ih = [getattr(r, f"weight_ih_l0{s}") for r, s in names]
    hh = [getattr(r, f"weight_hh_l0{s}") for r, s in names]
    w_ih = w_hh = None
    if not (torch.is_grad_enabled() and any(p.requires_grad for p in ih + hh)) and not torch.compiler.is_compiling():
        w_ih, w_hh = _back_to_back(ih, dtype), _back_to_back(hh, dtype)
    w_ih = torch.cat(ih).to(dtype) if w_ih is None else w_ih
    w_hh = torch.stack(hh).to(dtype) if w_hh is None else w_hh.view(len(hh), *hh[0].shape)
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
