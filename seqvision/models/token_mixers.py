"""The token mixers of Sequencer: BiLSTM2D (Sec. 3.2, Fig. 3), an RNN down every column and one along every row,
and the vanilla Sequencer's BiLSTM1D (Sec. 3.1), one RNN over the tokens in raster order.

Both take and return B x H x W x C. The recurrences run in ``seqvision.ops.rnn2d`` (the engine chosen at run time);
under TorchScript they run on the nn.LSTM / GRU / RNN modules themselves, and in FX graphs each mixer is one node.
"""

import torch
from torch import Tensor, nn

from .. import ops
from ..ops.packing import share_storage
from ..ops.reference import columns, from_columns, from_rows, join, rows
from ..ops.tracing import fx_leaf

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


def _make_rnn(cell: str, dim: int, hidden_size: int, bidirectional: bool) -> nn.RNNBase:
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r}; choose one of {', '.join(CELLS)}")
    kwargs = {"nonlinearity": "tanh"} if cell == "rnn" else {}
    return CELLS[cell](dim, hidden_size, num_layers=1, batch_first=True, bidirectional=bidirectional, **kwargs)


class BiLSTM2D(nn.Module):
    """The 2D token mixer (Sec. 3.2, Fig. 3): vertical + horizontal RNNs, union, channel fusion.

    ``cell`` picks LSTM (paper), GRU or tanh-RNN; ``union`` is "cat" (paper), "add", or one axis only
    ("vertical" / "horizontal"); ``with_fc`` turns the channel-fusion Linear on or off.
    """

    def __init__(
        self,
        dim: int,
        hidden_size: int,
        cell: str = "lstm",
        bidirectional: bool = True,
        union: str = "cat",
        with_fc: bool = True,
    ):
        super().__init__()
        if union not in ops.UNIONS:
            raise ValueError(f"unknown union {union!r}; choose one of {', '.join(ops.UNIONS)}")
        self.union = union
        rnn_out = hidden_size * (2 if bidirectional else 1)
        self.rnn_v = _make_rnn(cell, dim, hidden_size, bidirectional) if union != "horizontal" else None
        self.rnn_h = _make_rnn(cell, dim, hidden_size, bidirectional) if union != "vertical" else None
        share_storage([r for r in (self.rnn_v, self.rnn_h) if r is not None])  # the fused engine reads it uncopied
        out = 2 * rnn_out if union == "cat" else rnn_out
        if with_fc:
            self.fc = nn.Linear(out, dim)
        elif out != dim:
            raise ValueError(f"without channel fusion the RNN output ({out}) must equal the width ({dim})")
        else:
            self.fc = None

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._fuse(self._mix_reference(x))
        return self._forward_eager(x)

    @torch.jit.unused
    def _forward_eager(self, x: Tensor) -> Tensor:
        # One node in FX graphs, so that a traced model still runs the engine chosen at run time.
        traced = fx_leaf(self, x)
        if traced is not None:
            return traced
        return self._fuse(ops.rnn2d(x, self.rnn_v, self.rnn_h, self.union))

    def _fuse(self, y: Tensor) -> Tensor:
        return self.fc(y) if self.fc is not None else y

    def _mix_reference(self, x: Tensor) -> Tensor:
        """TorchScript's path: the reference computation on the nn.LSTM / GRU / RNN modules themselves."""
        B, H, W, _ = x.shape
        v: Tensor | None = None
        h: Tensor | None = None
        if self.rnn_v is not None:
            v = from_columns(self.rnn_v(columns(x))[0], B, H, W)
        if self.rnn_h is not None:
            h = from_rows(self.rnn_h(rows(x))[0], B, H, W)
        return join(v, h, self.union)


class BiLSTM1D(nn.Module):
    """The vanilla Sequencer's token mixer (Sec. 3.1): one RNN over the tokens in raster order."""

    def __init__(self, dim: int, hidden_size: int, cell: str = "lstm", bidirectional: bool = True):
        super().__init__()
        self.rnn = _make_rnn(cell, dim, hidden_size, bidirectional)
        share_storage([self.rnn])
        if hidden_size * (2 if bidirectional else 1) != dim:
            raise ValueError(f"the vanilla Sequencer needs RNN output == width ({dim})")

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # the reference computation on the RNN module itself
            B, H, W, C = x.shape
            y = self.rnn(x.reshape(B, H * W, C))[0]
            return y.reshape(B, H, W, y.shape[-1])
        return self._forward_eager(x)

    @torch.jit.unused
    def _forward_eager(self, x: Tensor) -> Tensor:
        traced = fx_leaf(self, x)  # one node in FX graphs, as BiLSTM2D
        if traced is not None:
            return traced
        # The raster sequence is one long row: the 2D engine's horizontal pass on a 1 x HW map.
        B, H, W, C = x.shape
        y = ops.rnn2d(x.flatten(1, 2).unsqueeze(1), None, self.rnn, "horizontal")
        return y.squeeze(1).unflatten(1, (H, W))
