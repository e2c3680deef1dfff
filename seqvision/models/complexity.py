"""Parameter and multiply-add counts, counting the LSTM matrix products as the paper does.

Counters such as fvcore or torch's FlopCounterMode skip nn.LSTM; the paper's GFLOPs (8.4 / 11.1 /
16.6 for S / M / L) include the LSTM input projections and recurrent products as multiply-adds.
Both conventions are reported: ``macs`` (with RNNs) and ``macs_without_rnn``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from .factory import create_model

_GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}


@dataclass
class Complexity:
    params: int
    macs: int  # per image, RNN products included (the paper's convention)
    macs_without_rnn: int  # per image, convolutions and linear layers only
    feature_shapes: list[tuple[int, int, int]]  # (H, W, C) of each stage output


def _rnn_macs(module: nn.RNNBase, inp: torch.Tensor) -> int:
    n, t, c = inp.shape  # batch_first
    dirs = 2 if module.bidirectional else 1
    gates = _GATES[type(module)]
    d = module.hidden_size
    return n * t * dirs * gates * d * (c + d)


def _shape_only_rnn(m: nn.RNNBase):
    out_size = m.hidden_size * (2 if m.bidirectional else 1)
    return lambda inp, hx=None: (inp.new_zeros(*inp.shape[:-1], out_size), None)


@torch.no_grad()
def count_complexity(model: nn.Module, img_size: int | tuple[int, int] = 224) -> Complexity:
    """Count one image's multiply-adds by running ``model`` on a meta-device copy of its structure.

    Works for any model (timm's too); RNN modules are counted with their recurrent products.
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    params = sum(p.numel() for p in model.parameters())
    dense, rnn = [0], [0]

    def on_conv(m: nn.Conv2d, inp, out):
        dense[0] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def on_linear(m: nn.Linear, inp, out):
        dense[0] += out.numel() * m.in_features

    def on_rnn(m: nn.RNNBase, inp, out):
        rnn[0] += _rnn_macs(m, inp[0])

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(on_conv))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(on_linear))
        elif isinstance(m, nn.RNNBase):
            handles.append(m.register_forward_hook(on_rnn))
            m.forward = _shape_only_rnn(m)  # counting needs only the output shape, not the recurrence
    x = torch.zeros(1, getattr(model, "in_chans", 3), h, w, device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with ops.use_engine("reference"):  # the reference path calls the RNN modules, so hooks see them
            if hasattr(model, "forward_intermediates"):
                final, feats = model.forward_intermediates(x, output_fmt="NHWC")
                model.forward_head(final)
                shapes = [tuple(f.shape[1:]) for f in feats]
            else:
                model(x)
                shapes = []
    finally:
        model.train(was_training)
        for hnd in handles:
            hnd.remove()
        for m in model.modules():
            if isinstance(m, nn.RNNBase) and "forward" in m.__dict__:
                del m.forward
    return Complexity(params, dense[0] + rnn[0], dense[0], shapes)


def variant_complexity(name: str, img_size: int | tuple[int, int] = 224, **kwargs) -> Complexity:
    """Complexity of a registered variant, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    return count_complexity(model, img_size)
