"""``seqvision erf``: effective receptive fields (Luo et al., 2016), the paper's ERF figure.

For each chosen layer: take its output at the centre position (row H//2-1, column W//2-1, as the
Sequencer authors do), sum it over the batch and the channels, and back-propagate that scalar to the
input. The ReLU of the input gradient, summed over images and colour channels, is the layer's ERF; maps
are shown as log10(sum + 1) and all layers of one figure share one min-max scale, so their extents can be
compared. Works for seqvision models and, for comparison, any timm model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import UserError
from ..models import Sequencer
from ..plots import new_figure, save_figure
from ..runtime import autocast, rnn_grad_mode

LAYOUTS = ("auto", "NCHW", "NHWC")


def default_layers(model: nn.Module) -> list[str]:
    """The stage outputs: ``stages.i`` for seqvision models, timm's ``feature_info`` modules otherwise."""
    info = getattr(model, "feature_info", None)
    names = []
    if isinstance(info, list):
        names = [d["module"] for d in info if isinstance(d, dict) and "module" in d]
    elif info is not None and hasattr(info, "module_name"):
        names = list(info.module_name())
    if not names:
        raise UserError("cannot tell this model's stages: name the layers with --layers")
    return names


def _layout(model: nn.Module, name: str, module: nn.Module, out: Tensor) -> str:
    """Where the channels are in a 4-D output: seqvision runs channels-last except in its convolutions;
    for timm models a layer in ``feature_info`` is matched by its channel count, else NCHW is assumed."""
    if isinstance(model, Sequencer):
        return "NCHW" if isinstance(module, nn.Conv2d) else "NHWC"
    for d in getattr(model, "feature_info", None) or []:
        if isinstance(d, dict) and d.get("module") == name:
            if out.shape[-1] == d["num_chs"] and out.shape[1] != d["num_chs"]:
                return "NHWC"
    return "NCHW"


def centre_value(out: Tensor, layout: str, prefix_tokens: int = 0) -> tuple[Tensor, tuple[int, int]]:
    """Sum over batch and channels of a feature map at its centre position; the (row, col) taken."""
    if out.ndim == 3:  # tokens B x N x C (ViT-like): drop class/register tokens, assume a square grid
        tokens = out[:, prefix_tokens:]
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise UserError(f"cannot place {tokens.shape[1]} tokens on a square grid")
        r = c = max(side // 2 - 1, 0)
        return tokens[:, r * side + c].sum(), (r, c)
    if out.ndim != 4:
        raise UserError(f"an ERF needs a spatial feature map, got shape {tuple(out.shape)}")
    h, w = (out.shape[1], out.shape[2]) if layout == "NHWC" else (out.shape[2], out.shape[3])
    r, c = max(h // 2 - 1, 0), max(w // 2 - 1, 0)
    v = out[:, r, c, :] if layout == "NHWC" else out[:, :, r, c]
    return v.sum(), (r, c)


def effective_receptive_field(
    model: nn.Module,
    batches: Iterable[Tensor],
    layers: Sequence[str],
    layout: str = "auto",
    device: str | torch.device = "cpu",
    amp: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """Summed ReLU(d centre / d input) over images and channels for each layer: H x W arrays (raw,
    not log-scaled), and per layer the feature-map shape and the centre position used."""
    device = torch.device(device)
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        sample = ", ".join(list(default_layers(model))[:6]) if hasattr(model, "feature_info") else ""
        raise UserError(f"no layer named {', '.join(missing)} in the model" + (f" (e.g. {sample})" if sample else ""))
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    captured: dict[str, Tensor] = {}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o)) for n in layers]
    sums: dict[str, Tensor] = {}
    info: dict[str, dict[str, Any]] = {}
    model.eval()
    try:
        with rnn_grad_mode(model):
            for x in batches:
                x = x.to(device).requires_grad_(True)
                captured.clear()
                with autocast(device, amp):
                    model(x)
                for k, name in enumerate(layers):
                    out = captured[name]
                    if isinstance(out, (tuple, list)):
                        out = out[0]
                    lay = _layout(model, name, modules[name], out) if layout == "auto" else layout
                    value, centre = centre_value(out, lay, prefix)
                    (grad,) = torch.autograd.grad(value.float(), x, retain_graph=k < len(layers) - 1)
                    contrib = grad.clamp(min=0).sum(dim=(0, 1)).detach().double().cpu()
                    sums[name] = sums[name] + contrib if name in sums else contrib
                    info[name] = dict(
                        feature_shape=list(out.shape[1:]),
                        layout=lay if out.ndim == 4 else "tokens",
                        centre=list(centre),
                    )
    finally:
        for h in hooks:
            h.remove()
    if not sums:
        raise UserError("no image reached the model")
    return {n: s.numpy() for n, s in sums.items()}, info


def log_maps(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """log10(sum + 1), the authors' ERF scale."""
    return {n: np.log10(m + 1.0) for n, m in raw.items()}


def shared_minmax(maps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All maps scaled by one min-max over all of them (so layers can be compared)."""
    lo = min(float(m.min()) for m in maps.values())
    hi = max(float(m.max()) for m in maps.values())
    span = hi - lo if hi > lo else 1.0
    return {n: (m - lo) / span for n, m in maps.items()}


def erf_stats(raw: np.ndarray, scaled: np.ndarray) -> dict[str, Any]:
    """Peak position, and the share of the input whose gradient is at least 1% of the peak (the ERF's area)."""
    peak = np.unravel_index(int(np.argmax(raw)), raw.shape)
    area = float((raw >= 0.01 * raw.max()).mean()) if raw.max() > 0 else 0.0
    return dict(peak=[int(peak[0]), int(peak[1])], scaled_max=float(scaled.max()), area_1pct=area)


def plot_erfs(maps: dict[str, np.ndarray], out_dir: Path, title: str, cmap: str = "RdYlGn") -> list[Path]:
    """One PNG per layer and one with all layers side by side, every one on the same 0..1 scale."""
    paths = []
    for name, m in maps.items():
        fig = new_figure(4, 3.6)
        ax = fig.add_subplot()
        im = ax.imshow(m, cmap=cmap, vmin=0, vmax=1)
        ax.set_title(f"{title}: {name}", fontsize=9)
        ax.axis("off")
        fig.colorbar(im, ax=ax, shrink=0.8)
        paths.append(save_figure(fig, out_dir / f"erf_{name.replace('.', '_')}.png"))
    n = len(maps)
    fig = new_figure(3 * n + 1, 3.2)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (name, m) in zip(axes, maps.items(), strict=True):
        im = ax.imshow(m, cmap=cmap, vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="log10(grad + 1), shared min-max")
    fig.suptitle(title)
    return [save_figure(fig, out_dir / "erf.png"), *paths]
