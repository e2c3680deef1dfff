"""Modules that FX tracing keeps whole: the engines' entry points stay one graph node each.

``torch.fx.symbolic_trace``, torchvision's ``create_feature_extractor`` and timm's ``feature_cls="fx"`` trace a
model by running its Python code on proxies and recording every operation. Traced through, the token mixers and
LayerNorms would fail on the engine choice (which looks at the tensor's device, dtype and autograd state) and,
were that baked in at trace time, the graph would lose the fused CPU and Triton GPU engines. Recorded as one
``call_module`` node instead, the graph calls the module itself at run time, which then picks its engine as
eager code does: a traced model computes exactly what the eager model computes, at the same speed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def fx_leaf(module: nn.Module, x: Tensor) -> Tensor | None:
    """Under an FX tracer, record ``module(x)`` as one ``call_module`` node and return its proxy; otherwise None
    (the caller then computes). Call it first thing in ``forward``: what a tracer's ``leaf_modules`` does, without
    the caller having to know the module."""
    if not isinstance(x, torch.fx.Proxy):
        return None
    tracer = x.tracer
    path = tracer.path_of_module(module)
    if not path:
        raise torch.fx.proxy.TraceError(
            f"{type(module).__name__} is kept whole in FX graphs and cannot be traced on its own; trace the model "
            "(or a block) that contains it"
        )
    return tracer.create_proxy("call_module", path, (x,), {})
