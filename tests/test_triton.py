"""The Triton BiLSTM2D engine (seqvision.ops.triton_lstm) against the reference nn.LSTM path.

No GPU is needed: the kernels run in Triton's interpreter on CPU tensors. TRITON_INTERPRET must be set before
triton is imported, and importing torch already imports triton, so the kernel checks run in one subprocess
(this file run as a script with the variables set), which reports each check's outcome; every check is then its
own pytest test. On a CUDA machine the same checks also run on the GPU (``test_cuda_*``).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

CHECKS: dict[str, Callable[[str], None]] = {}


def check(fn: Callable[[str], None]) -> Callable[[str], None]:
    CHECKS[fn.__name__] = fn
    return fn


# -- Helpers used inside the checks ----------------------------------------------------------------------------
def _lstms(
    C: int, D: int, v: bool = True, h: bool = True, bidirectional: bool = True, bias: bool = True
) -> tuple[nn.LSTM | None, nn.LSTM | None]:
    torch.manual_seed(0)
    make = lambda: nn.LSTM(C, D, batch_first=True, bidirectional=bidirectional, bias=bias)
    return (make() if v else None), (make() if h else None)


@contextlib.contextmanager
def _first_use_forgotten() -> Iterator[None]:
    """Inside, every first-use decision (does a kernel run here, which setting) is made afresh; restored after."""
    from seqvision.ops import triton_lstm

    tables = (triton_lstm._RUNS_HERE, triton_lstm._CHOSEN)
    saved = [dict(t) for t in tables]
    for t in tables:
        t.clear()
    try:
        yield
    finally:
        for t, before in zip(tables, saved, strict=True):
            t.clear()
            t.update(before)


def _params(*rnns: nn.Module | None) -> list[torch.Tensor]:
    return [p for r in rnns if r is not None for p in r.parameters()]


def _compare(shape, D, union="cat", device="cpu", atol=1e-5, rtol=1e-5, **kw) -> None:
    """Forward and every gradient (x, W_ih, W_hh, b_ih, b_hh of each direction) vs the reference, fp32."""
    from seqvision.ops.reference import rnn2d_reference
    from seqvision.ops.triton_lstm import rnn2d_triton

    rv, rh = _lstms(shape[-1], D, **kw)
    rv, rh = (r.to(device) if r is not None else None for r in (rv, rh))
    x = torch.randn(*shape, device=device, requires_grad=True)
    y = rnn2d_triton(x, rv, rh, union)
    assert y is not None, "configuration unexpectedly not covered"
    ref = rnn2d_reference(x, rv, rh, union)
    torch.testing.assert_close(y, ref, atol=atol, rtol=rtol)
    with torch.no_grad():  # the inference path (nothing saved for the backward) gives the same output
        torch.testing.assert_close(rnn2d_triton(x, rv, rh, union), y, atol=0, rtol=0)

    grad = torch.randn_like(ref)
    inputs = [x, *_params(rv, rh)]
    got = torch.autograd.grad(y, inputs, grad)
    want = torch.autograd.grad(ref, inputs, grad)
    names = ["x"] + [n for r in (rv, rh) if r is not None for n, _ in r.named_parameters()]
    # dW_ih sums dz * x over every position: on a GPU the reference (cuDNN) and torch's GEMM sum in other orders,
    # measured up to 1.8e-5 apart on elements of ~0.01-0.05 (H100, fp32, TF32 off).
    g_atol = max(atol, 5e-5) if device == "cuda" else atol
    for name, g, w in zip(names, got, want, strict=True):
        torch.testing.assert_close(g, w, atol=g_atol, rtol=10 * rtol, msg=lambda m, n=name: f"grad of {n}: {m}")


# -- Checks (run in the interpreter subprocess; each takes the device to run on) -------------------------------
@check
def forward_backward_fp32(device: str) -> None:
    # H != W, two tiles of 16 sequences for the vertical axis (B*W = 21), one busy + one idle tile horizontally.
    _compare((3, 5, 7, 8), D=6, device=device)


@check
def batch_one_and_hidden_padding(device: str) -> None:
    _compare((1, 4, 2, 5), D=20, device=device)  # D = 20 is padded to 32 inside the kernel


@check
def hidden_exactly_a_block(device: str) -> None:
    _compare((2, 3, 2, 4), D=16, device=device)


@check
def gpu_block_configs(device: str) -> None:
    """Every GPU launch candidate (wider tiles; the hidden state in one padded piece or split in two) runs in the
    interpreter too, at Sequencer2D's hidden sizes."""
    from seqvision.ops import triton_lstm

    original = triton_lstm._config
    try:
        for D in (48, 96):
            candidates = triton_lstm._candidates(D, torch.float16, torch.device("cuda"))
            assert [c["BLOCK_B"] > 0 for c in candidates] == [False, True], candidates  # one piece, then split
            for cfg in candidates:
                assert cfg["BLOCK_N"] >= 16 and cfg["BLOCK_A"] + cfg["BLOCK_B"] >= D, cfg
                triton_lstm._config = lambda *_, cfg=cfg: cfg
                if device == "cuda" and not triton_lstm._fits_gpu(D, torch.float32):  # fp32 D = 96: cuDNN's job
                    rnn = nn.LSTM(8, D, batch_first=True, bidirectional=True).to(device)
                    assert triton_lstm.rnn2d_triton(torch.randn(1, 3, 2, 8, device=device), rnn, rnn, "cat") is None
                    continue
                _compare((1, 3, 2, 8), D=D, device=device, atol=2e-5)
    finally:
        triton_lstm._config = original


@check
def split_hidden_state(device: str) -> None:
    """The hidden state held in two pieces (BLOCK_B > 0) at hidden sizes where the second is padded, with and
    without prefetch, fp32 and bf16, against the reference."""
    from seqvision.ops import triton_lstm
    from seqvision.ops.reference import rnn2d_reference

    assert triton_lstm.pieces(96, True) == (64, 32) and triton_lstm.pieces(48, True) == (32, 16)
    assert triton_lstm.pieces(96, False) == (128, 0) and triton_lstm.pieces(64, True) == (64, 0)
    assert triton_lstm.pieces(20, True) == (16, 16) and triton_lstm.pieces(12, True) == (16, 0)
    original = triton_lstm._config

    def split(D, dtype, dev, prefetch=True):
        block_a, block_b = triton_lstm.pieces(D, True)
        return {**original(D, dtype, dev), "BLOCK_A": block_a, "BLOCK_B": block_b, "PREFETCH": prefetch}

    try:
        for prefetch in (True, False):
            triton_lstm._config = lambda D, dtype, dev, p=prefetch: split(D, dtype, dev, p)
            _compare((3, 5, 7, 8), D=20, device=device)  # 16 + 4 of 16: H != W, two tiles vertically
            _compare((2, 1, 3, 6), D=40, union="add", device=device)  # 32 + 8 of 16, T = 1 vertically
        _compare((2, 3, 4, 6), D=20, union="vertical", h=False, bidirectional=False, device=device)  # one direction
        rv, rh = (r.to(device) for r in _lstms(8, 20))
        x = torch.randn(2, 3, 5, 8, device=device)
        ref = rnn2d_reference(x, rv, rh, "cat")
        with torch.autocast(device, dtype=torch.bfloat16):
            y = triton_lstm.rnn2d_triton(x, rv, rh, "cat")
        assert y.dtype == torch.bfloat16
        err = (y.float() - ref).abs().max().item()
        assert 0 < err < 2e-2, f"bf16 forward error {err}"
    finally:
        triton_lstm._config = original


@check
def without_prefetch(device: str) -> None:
    """The kernels' PREFETCH=False variant (each step loads its own inputs) computes the same function."""
    from seqvision.ops import triton_lstm

    original = triton_lstm._config
    triton_lstm._config = lambda D, dtype, dev: {**original(D, dtype, dev), "PREFETCH": False}
    try:
        _compare((3, 5, 7, 8), D=6, device=device)
        _compare((2, 1, 3, 4), D=5, device=device)  # T = 1 vertically: no step to prefetch
    finally:
        triton_lstm._config = original


@check
def union_add(device: str) -> None:
    _compare((2, 3, 4, 6), D=5, union="add", device=device)


@check
def unidirectional_cat_and_add(device: str) -> None:
    _compare((2, 3, 4, 6), D=5, union="cat", bidirectional=False, device=device)
    _compare((2, 3, 4, 6), D=5, union="add", bidirectional=False, device=device)


@check
def single_axis(device: str) -> None:
    _compare((2, 3, 4, 6), D=5, union="vertical", h=False, device=device)
    _compare((2, 3, 4, 6), D=5, union="horizontal", v=False, device=device)
    _compare((2, 1, 12, 6), D=5, union="horizontal", v=False, device=device)  # BiLSTM1D's call: H = 1


@check
def without_bias(device: str) -> None:
    _compare((2, 3, 4, 6), D=5, bias=False, device=device)


@check
def bf16_autocast_fp32_cell(device: str) -> None:
    from seqvision.ops.reference import rnn2d_reference
    from seqvision.ops.triton_lstm import rnn2d_triton, rnn2d_triton_op

    rv, rh = (r.to(device) for r in _lstms(8, 6))
    x = torch.randn(2, 5, 3, 8, device=device, requires_grad=True)
    ref = rnn2d_reference(x, rv, rh, "cat")  # fp32 ground truth
    with torch.autocast(device, dtype=torch.bfloat16):
        y = rnn2d_triton(x, rv, rh, "cat")
    assert y.dtype == torch.bfloat16
    err = (y.float() - ref).abs().max().item()
    assert err < 2e-2, f"bf16 forward error {err}"
    assert err > 0, "bf16 output identical to fp32: the bf16 path was not taken"

    grad = torch.randn_like(ref)
    inputs = [x, *_params(rv, rh)]
    got = torch.autograd.grad(y, inputs, grad.bfloat16())
    want = torch.autograd.grad(ref, inputs, grad)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype == torch.float32  # parameters keep their dtype under autocast
        rel = ((g - w).abs().max() / w.abs().max()).item()
        assert rel < 5e-2, f"bf16 gradient relative error {rel}"

    # The cell state the op saves is fp32 whatever the input dtype.
    gx = torch.randn(1, 2, 3, 16 * 4, device=device, dtype=torch.bfloat16)
    out, gates, c = rnn2d_triton_op(gx, torch.randn(4, 16, 4, device=device), [0, 1, 2, 3], True)
    assert out.dtype == gates.dtype == torch.bfloat16 and c.dtype == torch.float32


@check
def inference_sees_in_place_weight_changes(device: str) -> None:
    """No state survives a call: in-place weight changes show in the next inference, also through ``.data``."""
    from seqvision.ops.reference import rnn2d_reference
    from seqvision.ops.triton_lstm import rnn2d_triton

    rv, rh = (r.to(device) for r in _lstms(8, 6))
    x = torch.randn(2, 3, 5, 8, device=device)
    with torch.no_grad():
        before = rnn2d_triton(x, rv, rh, "cat")
        rh.weight_hh_l0_reverse.mul_(0.5)  # an optimizer step
        rv.bias_ih_l0.data.add_(0.25)  # old-style code: no version counter bump
        after = rnn2d_triton(x, rv, rh, "cat")
        torch.testing.assert_close(after, rnn2d_reference(x, rv, rh, "cat"), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after)


@check
def half_modules(device: str) -> None:
    from seqvision.ops.reference import rnn2d_reference
    from seqvision.ops.triton_lstm import rnn2d_triton

    rv, rh = (r.to(device) for r in _lstms(8, 6))
    x = torch.randn(2, 3, 5, 8, device=device)
    ref = rnn2d_reference(x, rv, rh, "cat")
    y = rnn2d_triton(x.half(), copy.deepcopy(rv).half(), copy.deepcopy(rh).half(), "cat")
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), ref, atol=3e-3, rtol=0)


@check
def uncovered_configurations_return_none(device: str) -> None:
    from seqvision.ops.triton_lstm import available, rnn2d_triton

    x = torch.randn(1, 2, 3, 4, device=device)
    assert available(x)
    lstm = lambda d=3, **kw: nn.LSTM(4, d, batch_first=True, bidirectional=True, **kw).to(device)
    gru = nn.GRU(4, 3, batch_first=True, bidirectional=True).to(device)
    rnn = nn.RNN(4, 3, batch_first=True, bidirectional=True).to(device)
    assert rnn2d_triton(x, gru, gru, "cat") is None
    assert rnn2d_triton(x, rnn, None, "vertical") is None
    assert rnn2d_triton(x, lstm(num_layers=2), lstm(num_layers=2), "cat") is None
    assert rnn2d_triton(x, lstm(proj_size=2), lstm(proj_size=2), "cat") is None
    assert rnn2d_triton(x, lstm(3), lstm(5), "cat") is None  # axes with different hidden sizes
    assert rnn2d_triton(x, lstm(), lstm(), "cat") is not None


@check
def custom_op_registration(device: str) -> None:
    from seqvision.ops.triton_lstm import rnn2d_triton_backward_op, rnn2d_triton_op

    torch.manual_seed(0)
    gx = torch.randn(2, 3, 2, 4 * 4 * 5, device=device, requires_grad=True)
    w = (0.3 * torch.randn(4, 4 * 5, 5, device=device)).requires_grad_()
    torch.library.opcheck(rnn2d_triton_op, (gx, w, [0, 1, 2, 3], True))
    y, gates, c = rnn2d_triton_op(gx, w, [0, 1, 2, 3], True)
    args = (torch.randn_like(y), gates.detach(), c.detach(), y.detach(), w.detach(), [0, 1, 2, 3])
    torch.library.opcheck(rnn2d_triton_backward_op, args)


@check
def compiles_as_one_op(device: str) -> None:
    from seqvision.ops.triton_lstm import rnn2d_triton

    rv, rh = (r.to(device) for r in _lstms(6, 5))
    x = torch.randn(2, 3, 4, 6, device=device, requires_grad=True)
    fn = torch.compile(lambda t: rnn2d_triton(t, rv, rh, "cat"), backend="aot_eager", fullgraph=True)
    y = fn(x)
    y_eager = rnn2d_triton(x, rv, rh, "cat")
    torch.testing.assert_close(y, y_eager, atol=0, rtol=0)
    g = torch.randn_like(y)
    inputs = [x, rv.weight_hh_l0, rh.weight_ih_l0_reverse]
    for a, b in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(y_eager, inputs, g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@check
def tiny_sequencer_end_to_end(device: str) -> None:
    """A whole Sequencer2D with its token mixing routed through the Triton engine, logits and grads vs reference."""
    from seqvision import ops
    from seqvision.models.sequencer import Sequencer
    from seqvision.ops.triton_lstm import rnn2d_triton

    torch.manual_seed(0)
    model = Sequencer((1, 1), (2, 1), (8, 8), (4, 4), num_classes=5, img_size=8).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    x = torch.randn(2, 3, 8, 6, device=device)
    with ops.use_engine("reference"):
        ref = model(x)
        ref_grads = torch.autograd.grad(ref.square().sum(), list(model.parameters()))

    calls = []
    original = ops.rnn2d

    def via_triton(x, rnn_v, rnn_h, union):
        calls.append(1)
        out = rnn2d_triton(x, rnn_v, rnn_h, union)
        assert out is not None
        return out

    ops.rnn2d = via_triton
    try:
        out = model(x)
        grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    finally:
        ops.rnn2d = original
    assert len(calls) == 2, "the model did not call seqvision.ops.rnn2d once per block"
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, w in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@check
def tiny_sequencer_autocast(device: str) -> None:
    """A whole Sequencer2D under bf16 autocast on the GPU engine (Triton recurrence and LayerNorm on the bf16
    stream) against the reference engine under the same autocast and against fp32."""
    from seqvision import ops
    from seqvision.models.sequencer import Sequencer
    from seqvision.ops import layer_norm

    torch.manual_seed(0)
    model = Sequencer((1, 1), (2, 1), (16, 16), (4, 4), num_classes=5, img_size=8).to(device).eval()
    x = torch.randn(2, 3, 8, 12, device=device)
    with torch.no_grad():
        for p in model.parameters():  # the authors' zero-initialised head would give all-zero logits
            p.copy_(torch.randn_like(p) * 0.2)
        with ops.use_engine("reference"):
            fp32 = model(x)
            with torch.autocast(device, dtype=torch.bfloat16):
                ref = model(x)
        calls = []
        original = layer_norm.layer_norm_triton_op
        layer_norm.layer_norm_triton_op = lambda *a: calls.append(a[0].dtype) or original(*a)
        try:
            with ops.use_engine("triton"), torch.autocast(device, dtype=torch.bfloat16):
                out = model(x)
        finally:
            layer_norm.layer_norm_triton_op = original
    assert calls and set(calls) == {torch.bfloat16}, calls  # every block norm ran in Triton, on the bf16 stream
    rel = lambda a: ((a.float() - fp32).norm() / fp32.norm()).item()
    assert rel(out) <= 1.5 * rel(ref) + 1e-3, (rel(out), rel(ref))


@check
def kernel_failure_falls_back_with_one_warning(device: str) -> None:
    """A GPU where a kernel cannot run (too little shared memory, no bf16 tensor cores): the first use finds out,
    warns once, and the layer runs on the torch path from then on, with the torch path's result."""
    import warnings

    from seqvision import ops
    from seqvision.ops import layer_norm, triton_lstm
    from seqvision.ops.reference import rnn2d_reference

    def broken(*args, **kwargs):
        raise RuntimeError("out of resource: shared memory, Required: 151552, Hardware limit: 101376")

    originals = triton_lstm.rnn2d_triton_op, layer_norm.layer_norm_triton_op
    triton_lstm.rnn2d_triton_op = layer_norm.layer_norm_triton_op = broken
    try:
        with _first_use_forgotten():
            rv, rh = (r.to(device) for r in _lstms(6, 5))
            x = torch.randn(2, 3, 4, 6, device=device)
            ours, ref = _layer_norm_pair(6, device)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                assert triton_lstm.rnn2d_triton(x, rv, rh, "cat") is None
                assert triton_lstm.rnn2d_triton(x, rv, rh, "cat") is None  # remembered: not tried again
                with ops.use_engine("triton"):
                    y = ops.rnn2d(x, rv, rh, "cat")
                with torch.no_grad():  # ops.LayerNorm tries Triton only where autograd records nothing
                    torch.testing.assert_close(ours(x), ref(x), atol=0, rtol=0)
                    ours(x)
            messages = [str(w.message) for w in caught]
            assert len(messages) == 2, messages
            assert "BiLSTM2D" in messages[0] and "shared memory" in messages[0], messages
            assert "LayerNorm" in messages[1], messages
            torch.testing.assert_close(y, rnn2d_reference(x, rv, rh, "cat"), atol=0, rtol=0)
    finally:
        triton_lstm.rnn2d_triton_op, layer_norm.layer_norm_triton_op = originals


@check
def next_candidate_when_the_first_cannot_run(device: str) -> None:
    """A GPU with too little shared memory for the one-piece kernels (D = 96 on an RTX 4090): Triton raises
    OutOfResources before launching, the launcher takes the split kernels instead, silently, and keeps them for
    this device; direct op calls (as in a graph torch.compile traced before any eager call) do the same."""
    import warnings

    from triton.runtime.errors import OutOfResources

    from seqvision.ops import triton_lstm
    from seqvision.ops.triton_lstm import rnn2d_triton_backward_op, rnn2d_triton_op

    class SmallGpu:  # launches only the split kernels, as a 99 KiB GPU would
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kw):
                if kw["BLOCK_B"] == 0:
                    raise OutOfResources(151552, 101376, "shared memory")
                launched.append(kw["BLOCK_B"])
                return self.kernel[grid](*args, **kw)

            return launch

    def candidates(D, dtype, dev):
        one = original_candidates(D, dtype, dev)[0]
        block_a, block_b = triton_lstm.pieces(D, True)
        return [one, {**one, "BLOCK_A": block_a, "BLOCK_B": block_b}]

    launched: list[int] = []
    original_kernels, original_candidates = triton_lstm._kernels, triton_lstm._candidates
    triton_lstm._kernels = lambda: tuple(SmallGpu(k) for k in original_kernels())
    triton_lstm._candidates = candidates
    try:
        with _first_use_forgotten():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _compare((2, 3, 4, 6), D=20, device=device)
            assert not [w for w in caught if "seqvision" in str(w.message)], [str(w.message) for w in caught]
            here = torch.empty(0, device=device).device  # "cuda:0", as the launcher keys it, not "cuda"
            chosen = triton_lstm._config(20, torch.float32, here)
            assert (chosen["BLOCK_A"], chosen["BLOCK_B"]) == (16, 16), chosen
            assert launched and set(launched) == {16}

            triton_lstm._CHOSEN.clear()  # nothing settled yet: the ops themselves fall back
            gx = torch.randn(1, 3, 2, 4 * 4 * 20, device=device)
            w = 0.2 * torch.randn(4, 4 * 20, 20, device=device)
            y, gates, c = rnn2d_triton_op(gx, w, [0, 1, 2, 3], True)
            triton_lstm._CHOSEN.clear()
            rnn2d_triton_backward_op(torch.ones_like(y), gates, c, y, w, [0, 1, 2, 3])
            assert triton_lstm._config(20, torch.float32, here)["BLOCK_B"] == 16

            # A GPU where no candidate fits (as in a graph traced before any eager call): one clear error.
            from seqvision.errors import EngineUnavailableError

            triton_lstm._candidates = lambda D, dtype, dev: original_candidates(D, dtype, dev)[:1]
            triton_lstm._CHOSEN.clear()
            try:
                rnn2d_triton_op(gx, w, [0, 1, 2, 3], False)
            except EngineUnavailableError as e:
                assert "do not fit this GPU at hidden size 20" in str(e) and "set_engine('reference')" in str(e), e
            else:
                raise AssertionError("no error where no kernel setting fits")
    finally:
        triton_lstm._kernels, triton_lstm._candidates = original_kernels, original_candidates


def _layer_norm_pair(C: int, device: str) -> tuple[nn.Module, nn.Module]:
    from seqvision import ops

    ours = ops.LayerNorm(C, eps=1e-6).to(device)
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    ref = nn.LayerNorm(C, eps=1e-6).to(device)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@check
def layer_norm_one_pass(device: str) -> None:
    """ops.LayerNorm's Triton forward where autograd records nothing, and ``layer_norm_triton`` (forward and
    Triton backward), against nn.LayerNorm: fp32, autocast, odd sizes."""
    from seqvision import ops
    from seqvision.ops import layer_norm

    torch.manual_seed(0)
    calls = []
    original = layer_norm.layer_norm_triton_op
    layer_norm.layer_norm_triton_op = lambda *a: calls.append(tuple(a[0].shape)) or original(*a)
    try:
        for shape in ((2, 3, 5, 6), (37, 20), (2, 4, 3, 48)):  # C = 6 / 20 padded; 37 rows: a partial block
            ours, ref = _layer_norm_pair(shape[-1], device)
            x = torch.randn(*shape, device=device, requires_grad=True)
            with torch.no_grad():
                torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
            assert {shape} <= set(calls), "the module did not take the Triton path with autograd off"
            y, want = layer_norm.layer_norm_triton(x, ours.weight, ours.bias, ours.eps), ref(x)
            torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
            g = torch.randn_like(want)
            got = torch.autograd.grad(y, [x, ours.weight, ours.bias], g)
            exp = torch.autograd.grad(want, [x, ref.weight, ref.bias], g)
            for a, b in zip(got, exp, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    finally:
        layer_norm.layer_norm_triton_op = original

    # Under autocast the output comes out in the autocast dtype: nn.LayerNorm's fp32 output, rounded.
    ours, ref = _layer_norm_pair(20, device)
    x = torch.randn(4, 3, 5, 20, device=device).transpose(1, 2)  # non-contiguous input
    with torch.autocast(device, dtype=torch.bfloat16), torch.no_grad():
        y, want = ours(x), ref(x)
        with ops.use_engine("reference"):
            plain = ours(x)
    assert y.dtype == torch.bfloat16 and want.dtype == plain.dtype == torch.float32
    torch.testing.assert_close(y.float(), want.bfloat16().float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(plain, want, atol=0, rtol=0)  # the reference engine is nn.LayerNorm exactly

    # The model's case under autocast: a bf16 stream, fp32 parameters. Against nn.LayerNorm in fp32 on the same
    # (bf16-valued) input and output gradient: the math is fp32 throughout, only y and dx are rounded to bf16.
    xb = torch.randn(2, 3, 4, 20, device=device).bfloat16().requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        y = layer_norm.layer_norm_triton(xb, ours.weight, ours.bias, ours.eps)
    xf = xb.detach().float().requires_grad_()
    want = ref(xf)
    assert y.dtype == xb.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want, atol=1e-2, rtol=1e-2)
    g = torch.randn_like(want).bfloat16()
    got = torch.autograd.grad(y, [xb, ours.weight, ours.bias], g)
    exp = torch.autograd.grad(want, [xf, ref.weight, ref.bias], g.float())
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    torch.testing.assert_close(got[0].float(), exp[0], atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(got[1], exp[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[2], exp[2], atol=1e-5, rtol=1e-4)

    # A bf16 model without autocast (bf16 parameters too): forward and backward, against fp32 on the same values.
    ours16 = copy.deepcopy(ours).bfloat16()
    xb = torch.randn(3, 4, 20, device=device).bfloat16().requires_grad_()
    y = layer_norm.layer_norm_triton(xb, ours16.weight, ours16.bias, ours16.eps)
    xf = xb.detach().float().requires_grad_()
    want = ref(xf)
    assert y.dtype == torch.bfloat16
    g = torch.randn_like(want).bfloat16()
    got = torch.autograd.grad(y, [xb, ours16.weight, ours16.bias], g)
    exp = torch.autograd.grad(want, [xf, ref.weight, ref.bias], g.float())
    for a, e in zip([y, *got], [want, *exp], strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), e, atol=5e-2, rtol=2e-2)

    xs = torch.randn(3, 4, 20, device=device, requires_grad=True)
    w, b = ours.weight.detach().requires_grad_(), ours.bias.detach()
    torch.library.opcheck(layer_norm.layer_norm_triton_op, (xs, w, b, 1e-6, torch.float32))


@check
def layer_norm_backward_in_triton(device: str) -> None:
    """``layer_norm_triton``'s backward runs its Triton kernel: several programs, each over several row blocks, the
    last one partial; dx, dw, db against nn.LayerNorm's (fp32), and the op's registration (opcheck). While autograd
    records, ops.LayerNorm is nn.LayerNorm, bit for bit (ATen's backward trains faster)."""
    from seqvision.ops import layer_norm

    torch.manual_seed(0)
    ours, ref = _layer_norm_pair(20, device)
    x = torch.randn(1000, 20, device=device, requires_grad=True)  # 16 blocks of 64 rows, 4 programs (interpreter)
    calls, forward_calls = [], []
    originals = layer_norm.layer_norm_triton_backward_op, layer_norm.layer_norm_triton_op
    layer_norm.layer_norm_triton_backward_op = lambda *a: calls.append(1) or originals[0](*a)
    try:
        y, want = layer_norm.layer_norm_triton(x, ours.weight, ours.bias, ours.eps), ref(x)
        g = torch.randn_like(want)
        got = torch.autograd.grad(y, [x, ours.weight, ours.bias], g)
        assert calls, "the backward did not run the Triton kernel"  # (a first use's trial launch may add a call)
        layer_norm.layer_norm_triton_op = lambda *a: forward_calls.append(1) or originals[1](*a)
        module_grads = torch.autograd.grad(ours(x), [x, ours.weight, ours.bias], g)
    finally:
        layer_norm.layer_norm_triton_backward_op, layer_norm.layer_norm_triton_op = originals
    assert forward_calls == [], "ops.LayerNorm took the Triton path while autograd was recording"
    exp = torch.autograd.grad(want, [x, ref.weight, ref.bias], g)
    for a, b in zip(got, exp, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for a, b in zip(module_grads, exp, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)

    _, mean, rstd = layer_norm.layer_norm_triton_op(x.detach(), ours.weight, ours.bias, 1e-6, torch.float32)
    args = (g, x.detach(), ours.weight.detach(), mean, rstd)
    torch.library.opcheck(layer_norm.layer_norm_triton_backward_op, args)


@check
def layer_norm_switched_off_by_environment(device: str) -> None:
    """SEQVISION_NO_TRITON_LAYERNORM=1: ops.LayerNorm is nn.LayerNorm, bit for bit, and its kernel never runs."""
    from seqvision.ops import layer_norm

    ours, ref = _layer_norm_pair(20, device)
    x = torch.randn(3, 4, 20, device=device)
    calls = []
    original = layer_norm.layer_norm_triton_op
    layer_norm.layer_norm_triton_op = lambda *a: calls.append(1) or original(*a)
    os.environ["SEQVISION_NO_TRITON_LAYERNORM"] = "1"
    try:
        torch.testing.assert_close(ours(x), ref(x), atol=0, rtol=0)
        assert calls == []
        os.environ["SEQVISION_NO_TRITON_LAYERNORM"] = "0"
        with torch.no_grad():
            ours(x)
        assert calls, "the Triton path was not taken with the switch at 0"  # (a first use's trial launch too)
    finally:
        os.environ.pop("SEQVISION_NO_TRITON_LAYERNORM", None)
        layer_norm.layer_norm_triton_op = original


# -- pytest side ------------------------------------------------------------------------------------------------
_HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(scope="module")
def interpreted() -> dict[str, str | None]:
    """Run every check once in the Triton interpreter (one subprocess); name -> None (passed) or the failure."""
    if not _HAS_TRITON:
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "SEQVISION_TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, "cpu"], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        output = proc.stdout[-3000:] + proc.stderr[-3000:]
        pytest.fail(f"interpreter subprocess failed (rc {proc.returncode}):\n{output}")
    return json.loads(lines[-1])


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_interpreted(interpreted: dict[str, str | None], name: str) -> None:
    assert name in interpreted, f"check {name} did not run"
    if interpreted[name] is not None:
        pytest.fail(f"{name} failed in the Triton interpreter:\n{interpreted[name]}", pytrace=False)


@pytest.mark.skipif(not (torch.cuda.is_available() and _HAS_TRITON), reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_cuda(name: str) -> None:
    if name == "bf16_autocast_fp32_cell" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    # cuDNN's RNNs use TF32 by default (allow_tf32 is True), which puts the fp32 reference ~3e-4 off; the
    # Triton engine's fp32 products are exact, so compare against an exact reference.
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        CHECKS[name]("cuda")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.mark.skipif(not (torch.cuda.is_available() and _HAS_TRITON), reason="needs a CUDA GPU and triton")
def test_cuda_sequencer2d_s_matches_timm() -> None:
    """Whole-model parity on the GPU: timm's sequencer2d_s (cuDNN) and seqvision's (Triton where it covers the
    block) with the same random weights, each against a float64 run of timm's model, in fp32 and bf16 autocast."""
    import timm
    from helpers import randomise

    from seqvision.models import create_model
    from seqvision.weights import load_weights

    oracle = randomise(timm.create_model("sequencer2d_s"), seed=3, std=0.02).cuda()
    ours = create_model("sequencer2d_s")
    load_weights(ours, oracle.state_dict())
    ours = ours.cuda().eval()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.no_grad():
        truth = copy.deepcopy(oracle).double()(x.double())
        rel = lambda out: ((out.double() - truth).norm() / truth.norm()).item()
        err = {"timm fp32": rel(oracle(x)), "seqvision fp32": rel(ours(x))}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            err |= {"timm bf16": rel(oracle(x)), "seqvision bf16": rel(ours(x))}
    print("relative logit error vs float64:", {k: f"{v:.2e}" for k, v in err.items()})
    assert err["seqvision fp32"] < 1e-3, err  # TF32 may be on in cuDNN and the GEMMs: not 1e-6
    assert err["seqvision bf16"] <= 1.5 * err["timm bf16"] + 1e-3, err


def test_tuned_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from seqvision.ops import triton_lstm

    monkeypatch.setattr(triton_lstm, "_CHOSEN", {})
    monkeypatch.setenv("SEQVISION_TRITON_TUNE", "64:32:4:0, 128:16:8:1:1")
    cfg = triton_lstm._config(48, torch.bfloat16, torch.device("cuda"))
    assert cfg == dict(BLOCK_A=64, BLOCK_B=0, BLOCK_N=32, num_warps=4, PREFETCH=False, num_stages=1)
    assert len(triton_lstm._candidates(48, torch.bfloat16, torch.device("cuda"))) == 1  # a tuned setting only
    cfg = triton_lstm._config(96, torch.bfloat16, torch.device("cuda"))
    assert cfg["PREFETCH"] is True and (cfg["BLOCK_A"], cfg["BLOCK_B"]) == (64, 32)  # split asked for
    monkeypatch.setenv("SEQVISION_TRITON_TUNE", "")
    cands = triton_lstm._candidates(96, torch.float16, torch.device("cuda"))  # the built-in defaults
    assert [(c["BLOCK_N"], c["BLOCK_A"], c["BLOCK_B"]) for c in cands] == [(16, 128, 0), (16, 64, 32)]
    assert triton_lstm._config(96, torch.float16, torch.device("cuda")) == cands[0]  # before any first use
    triton_lstm._CHOSEN[("cuda", torch.float16, 96)] = cands[1]  # a fallback taken on this device
    assert triton_lstm._config(96, torch.float16, torch.device("cuda")) == cands[1]
    monkeypatch.setenv("SEQVISION_TRITON_TUNE", "128:32:4:1")  # the environment's setting comes first
    assert triton_lstm._config(96, torch.float16, torch.device("cuda"))["BLOCK_N"] == 32
    monkeypatch.setenv("SEQVISION_TRITON_TUNE", "128:16")
    with pytest.raises(ValueError, match="BLOCK_D:BLOCK_N:num_warps:prefetch"):
        triton_lstm._config(96, torch.float16, torch.device("cuda"))


def test_chosen_settings_report(monkeypatch: pytest.MonkeyPatch) -> None:
    from seqvision.ops import triton_lstm

    split96 = triton_lstm._candidates(96, torch.bfloat16, torch.device("cuda"))[1]
    one48 = triton_lstm._candidates(48, torch.bfloat16, torch.device("cuda"))[0]
    chosen = {("cuda:0", torch.bfloat16, 96): split96, ("cuda:0", torch.bfloat16, 48): one48}
    monkeypatch.setattr(triton_lstm, "_LAUNCHED", chosen | {("cuda:1", torch.float16, 48): one48})
    assert triton_lstm.chosen_settings("cuda:0") == {
        "torch.bfloat16, D=48": "hidden state in one piece of 64, 16 sequences x 8 warps, prefetch",
        "torch.bfloat16, D=96": "hidden state split 64 + 32, 16 sequences x 8 warps, prefetch",
    }
    assert list(triton_lstm.chosen_settings(torch.device("cuda", 1))) == ["torch.float16, D=48"]
    assert len(triton_lstm.chosen_settings("cuda")) == 3  # no index: every CUDA device's
    assert triton_lstm.chosen_settings("cpu") == {}


def test_cpu_without_interpreter_is_not_available(monkeypatch: pytest.MonkeyPatch) -> None:
    from seqvision.ops.triton_lstm import available, rnn2d_triton

    monkeypatch.delenv("SEQVISION_TRITON_INTERPRET", raising=False)
    x = torch.randn(1, 2, 2, 4)
    lstm = nn.LSTM(4, 3, batch_first=True, bidirectional=True)
    assert not available(x)
    assert rnn2d_triton(x, lstm, lstm, "cat") is None


def test_imports_without_triton() -> None:
    """A CPU-only install without triton still imports seqvision and its ops; the engine just declines."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, seqvision, seqvision.ops\n"
        "from seqvision.ops import triton_lstm as t\n"
        "x = torch.zeros(1, 2, 2, 4)\n"
        "lstm = torch.nn.LSTM(4, 3, batch_first=True, bidirectional=True)\n"
        "assert not t.available(x) and t.rnn2d_triton(x, lstm, lstm, 'cat') is None\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "SEQVISION_TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


if __name__ == "__main__":  # the interpreter subprocess: run every check, report as one JSON line
    torch.set_num_threads(1)
    results: dict[str, str | None] = {}
    for check_name, fn in CHECKS.items():
        try:
            fn(sys.argv[1] if len(sys.argv) > 1 else "cpu")
            results[check_name] = None
        except Exception:
            results[check_name] = traceback.format_exc()
    print(json.dumps(results))
