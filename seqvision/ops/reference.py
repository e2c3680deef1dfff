"""Reference BiLSTM2D token mixing built on torch's nn.LSTM / nn.GRU / nn.RNN.

This is the path the authors' code and timm's port take: the vertical RNN reads every column
(sequences of length H, batch B*W), the horizontal RNN reads every row (length W, batch B*H).
It is kept as the ground truth for the fused engine and as its fallback.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

UNIONS = ("cat", "add", "vertical", "horizontal")


def run_vertical(x: Tensor, rnn: nn.RNNBase) -> Tensor:
    """Run ``rnn`` down every column of a B x H x W x C map; returns B x H x W x (dirs * D)."""
    B, H, W, C = x.shape
    v, _ = rnn(x.transpose(1, 2).reshape(B * W, H, C))
    return v.reshape(B, W, H, -1).transpose(1, 2)


def run_horizontal(x: Tensor, rnn: nn.RNNBase) -> Tensor:
    """Run ``rnn`` along every row of a B x H x W x C map; returns B x H x W x (dirs * D)."""
    B, H, W, C = x.shape
    h, _ = rnn(x.reshape(B * H, W, C))
    return h.reshape(B, H, W, -1)


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
