"""LayerNorm for the GPU engine: nn.LayerNorm whose CUDA forward is one Triton pass writing the compute dtype.

Why: profiled on an H100 (bf16 autocast, batch 256, benchmarks/RESULTS.md), a third of Sequencer2D-S's eager
forward went to LayerNorm (7.6 ms) and a dtype cast per LayerNorm (3.6 ms) out of 33.4 ms, more than the LSTM
recurrences took: under autocast nn.LayerNorm writes fp32, and the Linear after it casts that to bf16 in
another pass. This module does it in one pass (fp32 statistics, output in the autocast dtype, the dtype that
Linear would cast it to anyway) and keeps nn.LayerNorm's parameters and state dict. The backward is one Triton
pass too (fp32 math; dx in the stream's dtype), where ATen's would need the bf16 stream and its gradient cast
to fp32 first and dx cast back (three more passes over the activations).

Measured on an H200 (bf16 autocast, batch 256, Sequencer2D-S, benchmarks/RESULTS.md): inference 13,433 img/s
with this forward against 8,656 with nn.LayerNorm; training 2,484 img/s with this forward and backward against
2,883 with nn.LayerNorm. So the module takes the Triton path only where autograd records nothing (inference);
while it records, it is nn.LayerNorm. The backward stays the op's autograd formula (``layer_norm_triton``).

It takes the Triton path only where the BiLSTM2D engine would (CUDA with triton, engine ``auto`` or
``triton``, not while torch.compile traces: Inductor fuses the plain ops itself); everywhere else, including
the ``reference`` engine and CPUs, it is nn.LayerNorm exactly. ``SEQVISION_NO_TRITON_LAYERNORM=1`` makes it
nn.LayerNorm everywhere (to compare the two in one run, or should the kernel misbehave on some GPU).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import triton_lstm
from .tracing import fx_leaf


@functools.cache
def _kernels():
    """(forward kernel, backward kernel), imported on first use: this module must not need triton."""
    from . import _triton_kernels as k

    return k.layer_norm_fwd_kernel, k.layer_norm_bwd_kernel


@functools.cache
def _programs_in_flight(device: torch.device) -> int:
    """How many backward programs to launch: each loops over its share of the rows and keeps its partial dw, db
    in registers, so a few per SM suffice (ptxas: 3 fit at once) and few partial sums are left to add up. Not
    tuned on a GPU yet."""
    return 8 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _blocks(C: int, device: torch.device, elements: int = 4096) -> dict:
    """Rows per block (``elements`` per block: the forward's 4K keep enough rows in flight per SM; the backward
    takes 2K, which ptxas fits in ~140 registers instead of 210-255), padded channels, warps."""
    block_c = triton_lstm.block_size(C)
    block_m = max(1, elements // block_c)
    return dict(BLOCK_M=block_m, BLOCK_C=block_c, num_warps=4 if device.type == "cuda" else 1)


@torch.library.custom_op("seqvision::layer_norm_triton", mutates_args=())
def layer_norm_triton_op(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm over the last dimension; returns (y in ``out_dtype``, mean, 1/std), the statistics fp32 of
    shape ``x.shape[:-1] + (1,)`` as ATen's native_layer_norm returns them."""
    C = x.shape[-1]
    x2 = x.contiguous().view(-1, C)
    M = x2.shape[0]
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean = torch.empty(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if M:
        cfg = _blocks(C, x.device)
        grid = (triton_lstm.cdiv(M, cfg["BLOCK_M"]),)
        _kernels()[0][grid](x2, weight.contiguous(), bias.contiguous(), y, mean, rstd, M, C, eps, **cfg)
    return y, mean, rstd


@layer_norm_triton_op.register_fake
def _(x, weight, bias, eps, out_dtype):
    stats = x.new_empty(*x.shape[:-1], 1, dtype=torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype), stats, torch.empty_like(stats)


@torch.library.custom_op("seqvision::layer_norm_triton_backward", mutates_args=())
def layer_norm_triton_backward_op(
    dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``layer_norm_triton`` (dx in x's dtype; dw, db in the weight's) from its saved statistics:
    one Triton pass over the rows with fp32 math, whatever the dtypes (a bf16 stream and fp32 parameters under
    autocast), then a sum of the programs' partial dw, db."""
    C = x.shape[-1]
    x2, dy2 = x.contiguous().view(-1, C), dy.contiguous().view(-1, C)
    M = x2.shape[0]
    dx = torch.empty_like(x2)
    if M == 0:
        return dx.view(x.shape), torch.zeros_like(weight), torch.zeros_like(weight)
    cfg = _blocks(C, x.device, elements=2048)
    blocks = triton_lstm.cdiv(M, cfg["BLOCK_M"])
    rows_per_program = triton_lstm.cdiv(blocks, _programs_in_flight(x.device)) * cfg["BLOCK_M"]
    programs = triton_lstm.cdiv(M, rows_per_program)
    dw = x.new_empty(programs, C, dtype=torch.float32)
    db = torch.empty_like(dw)
    _kernels()[1][(programs,)](x2, dy2, weight.contiguous(), mean, rstd, dx, dw, db, M, C, rows_per_program, **cfg)
    return dx.view(x.shape), dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype)


@layer_norm_triton_backward_op.register_fake
def _(dy, x, weight, mean, rstd):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, out_dtype = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = layer_norm_triton_backward_op(dy, x, weight, mean, rstd)
    grads = (dx, dw, db)
    return *(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad[:3], strict=True)), None, None


layer_norm_triton_op.register_autograd(_backward, setup_context=_setup_context)


def _out_dtype(x: Tensor) -> torch.dtype:
    """The autocast dtype under autocast (what the Linear after the norm would cast to), else x's dtype."""
    on = torch.is_autocast_enabled(x.device.type)
    return torch.get_autocast_dtype(x.device.type) if on else x.dtype


def layer_norm_triton(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm over the last dimension in the Triton kernels, differentiable (the Triton backward), output in
    ``_out_dtype(x)``. ``LayerNorm`` calls it only where autograd records nothing; callers that want the Triton
    backward call it directly."""
    return layer_norm_triton_op(x, weight, bias, eps, _out_dtype(x))[0]


def _runs_here(x: Tensor, param_dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    C, device = x.shape[-1], x.device

    def probe() -> None:  # forward and backward kernels
        w = torch.ones(C, device=device, dtype=param_dtype)
        x4 = torch.randn(4, C, device=device, dtype=x.dtype)
        y, mean, rstd = layer_norm_triton_op(x4, w, w, 1e-6, out_dtype)
        layer_norm_triton_backward_op(torch.ones_like(y), x4, w, mean, rstd)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def what() -> str:
        return f"the Triton LayerNorm kernels ({x.dtype} -> {out_dtype}, {C} channels)"

    block_c = triton_lstm.block_size(C)
    return triton_lstm.runs_here(("layer_norm", str(device), x.dtype, param_dtype, out_dtype, block_c), probe, what)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the last dimension; on CUDA one Triton pass whose output is in the autocast dtype
    when autocast is on (see the module docstring). Same parameters and state dict as nn.LayerNorm.

    TorchScript compiles it as nn.LayerNorm; FX graphs keep it as one node that chooses its path at run time."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return self._forward_eager(x)

    @torch.jit.unused
    def _forward_eager(self, x: Tensor) -> Tensor:
        traced = fx_leaf(self, x)
        if traced is not None:
            return traced
        if self._fast_path(x) and _runs_here(x, self.weight.dtype, _out_dtype(x)):
            return layer_norm_triton(x, self.weight, self.bias, self.eps)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    @torch.jit.unused
    def _fast_path(self, x: Tensor) -> bool:
        from . import get_engine  # defined in the package after this module is imported

        return (
            get_engine() in ("auto", "triton")
            and os.environ.get("SEQVISION_NO_TRITON_LAYERNORM", "") in ("", "0")
            and not torch.compiler.is_compiling()
            and triton_lstm.available(x)
            and self.weight is not None
            and self.bias is not None
            and len(self.normalized_shape) == 1
            # Same dtype as the parameters, or under autocast (where the stream is bf16/fp16 from the stem's conv
            # on and nn.LayerNorm would upcast it to fp32 in an extra pass, then cast its output back in another).
            and (x.dtype == self.weight.dtype or torch.is_autocast_enabled(x.device.type))
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            # Training is faster on ATen's backward (module docstring).
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, self.weight, self.bias)))
        )
