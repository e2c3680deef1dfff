"""Multiply-add counts: the paper's convention (LSTM products included) and the usual one."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import seqvision
from seqvision import ops
from seqvision.models.complexity import count_complexity, variant_complexity


def test_sequencer2d_s_matches_the_paper():
    c = variant_complexity("sequencer2d_s")
    assert c.params == 27_651_688
    assert c.macs / 1e9 == pytest.approx(8.33, abs=0.01)  # paper: 8.4 GFLOPs (= multiply-adds)
    assert c.macs_without_rnn / 1e9 == pytest.approx(4.94, abs=0.01)
    assert c.feature_shapes == [(32, 32, 192), (16, 16, 384), (16, 16, 384), (16, 16, 384)]


def test_lstm_share_follows_the_closed_form():
    # 18 blocks x tokens x 4 directions x 4 gates x D x (C + D): ~3.39 G for S at 224 (reference, Sec. 2).
    expected = 4 * 1024 * 4 * 4 * 48 * (192 + 48) + 14 * 256 * 4 * 4 * 96 * (384 + 96)
    c = variant_complexity("sequencer2d_s")
    assert c.macs - c.macs_without_rnn == expected


def test_l_at_392_and_cells():
    assert variant_complexity("sequencer2d_l_392", 392).macs / 1e9 == pytest.approx(50.5, abs=0.1)
    lstm, gru = variant_complexity("sequencer2d_s"), variant_complexity("gru_sequencer2d_s")
    # GRU has 3 gates to the LSTM's 4: the recurrent share shrinks by exactly a quarter.
    assert (gru.macs - gru.macs_without_rnn) * 4 == (lstm.macs - lstm.macs_without_rnn) * 3


def test_dense_count_agrees_with_torch_flop_counter():
    # torch's counter skips nn.LSTM: it is an independent check of the convolution + linear part.
    model = seqvision.create_model("sequencer2d_s", layers=(1, 1, 2, 1), num_classes=10).eval()
    ours = count_complexity(model, (112, 84))
    counter = FlopCounterMode(display=False)
    with ops.use_engine("reference"), counter, torch.no_grad():
        model(torch.randn(1, 3, 112, 84))
    assert counter.get_total_flops() == 2 * ours.macs_without_rnn
