"""Build any registered Sequencer by name, optionally with weights: ``create_model``, ``list_models``."""

from __future__ import annotations

import difflib
import fnmatch
import os
from typing import Any

from timm.models._features import FeatureGetterNet
from torch import nn

from ..errors import UnknownModelError
from .sequencer import ALIASES, VARIANTS, Sequencer, pretrained_cfg_for


def list_models(pattern: str = "*") -> list[str]:
    """Registered variant names matching a shell-style pattern, e.g. ``list_models("sequencer2d_*")``."""
    return sorted(n for n in VARIANTS if fnmatch.fnmatch(n, pattern))


def resolve_name(name: str) -> str:
    """The registered name for ``name`` (an alias of the authors' is accepted); a clear error if unknown."""
    name = ALIASES.get(name, name)
    if name not in VARIANTS:
        close = difflib.get_close_matches(name, list(VARIANTS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}.{hint} `seqvision models` lists all {len(VARIANTS)}.")
    return name


def model_config(name: str) -> dict[str, Any]:
    """The constructor arguments of a registered variant."""
    return dict(VARIANTS[resolve_name(name)])


def create_model(
    name: str,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    drop_path_rate: float | None = None,
    in_chans: int = 3,
    features_only: bool = False,
    out_indices: tuple[int, ...] = (0, 1, 2, 3),
    output_fmt: str = "NCHW",
    **kwargs: Any,
) -> nn.Module:
    """Build a Sequencer variant by name.

    Args:
        name: a registered variant (``list_models()``), e.g. ``"sequencer2d_s"``.
        pretrained: load the published ImageNet-1K weights (downloaded once into torch's hub cache).
        checkpoint_path: load weights from this file instead (authors', timm's or seqvision's format).
        num_classes: classifier size; a checkpoint with another head gets a fresh head (with a warning).
        img_size: the input size the model is meant for (sets ``pretrained_cfg`` and the position
            embedding of ``v_sequencer_s_pe``); any size works at run time.
        drop_path_rate: stochastic depth; ``drop_path_schedule="constant"`` gives timm's rule.
        features_only: return a feature extractor giving the stage outputs in ``out_indices``.
        **kwargs: any other ``Sequencer`` argument (e.g. ``cell="gru"``, ``union="add"``).
    """
    name = resolve_name(name)
    cfg = dict(VARIANTS[name])
    cfg.update(kwargs)
    if num_classes is not None:
        cfg["num_classes"] = num_classes
    if img_size is not None:
        cfg["img_size"] = img_size
    if drop_path_rate is not None:
        cfg["drop_path_rate"] = drop_path_rate
    cfg["in_chans"] = in_chans
    model = Sequencer(**cfg)
    model.pretrained_cfg = pretrained_cfg_for(name, model.num_classes, cfg.get("img_size"))
    model.default_cfg = model.pretrained_cfg
    model.variant = name

    from ..weights import load_pretrained, load_weights

    if checkpoint_path is not None:
        load_weights(model, checkpoint_path)
    elif pretrained:
        load_pretrained(model, name)

    if features_only:
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError("output_fmt must be 'NCHW' or 'NHWC'")
        return FeatureGetterNet(model, out_indices=out_indices, output_fmt=output_fmt)
    return model
