"""Build any registered Sequencer by name, optionally with weights: ``create_model``, ``list_models``."""

from __future__ import annotations

import difflib
import fnmatch
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from timm.models._features import FeatureGetterNet
from timm.models._features_fx import FeatureGraphNet
from torch import Tensor, nn

from ..errors import CheckpointError, UnknownModelError
from ..weights import HEAD_KEYS, authors_to_timm, detect_format, load_from_url, load_weights
from .sequencer import ALIASES, PRETRAINED_URLS, VARIANTS, Sequencer, pretrained_cfg_for


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


FEATURE_CLASSES = ("getter", "fx")
# timm's create_model options that need nothing here: every seqvision model scripts, traces and exports as it is.
_LAYER_CONFIG_ARGS = ("scriptable", "exportable", "no_jit")


def create_model(
    name: str,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    drop_path_rate: float | None = None,
    in_chans: int | None = 3,
    features_only: bool = False,
    out_indices: tuple[int, ...] = (0, 1, 2, 3),
    output_fmt: str | None = None,
    feature_cls: str | type = "getter",
    global_pool: str | None = None,
    pretrained_cfg_overlay: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a Sequencer variant by name, with timm's ``create_model`` arguments.

    Args:
        name: a registered variant (``list_models()``), e.g. ``"sequencer2d_s"``.
        pretrained: load the published ImageNet-1K weights (downloaded once into torch's hub cache, or
            ``cache_dir``), or the file named by ``pretrained_cfg_overlay={"file": ...}``.
        checkpoint_path: load weights from this file instead (authors', timm's or seqvision's format).
        num_classes: classifier size; a checkpoint with another head gets a fresh head (with a warning).
        img_size: the input size the model is meant for (sets ``pretrained_cfg`` and the position
            embedding of ``v_sequencer_s_pe``); any size works at run time.
        drop_path_rate: stochastic depth; ``drop_path_schedule="constant"`` gives timm's rule.
        in_chans: input channels; a 3-channel checkpoint's stem is adapted to them (summed, or repeated and scaled).
        features_only: return a feature extractor giving the stage outputs in ``out_indices``.
        output_fmt: the feature maps' layout, "NCHW" (default) or "NHWC".
        feature_cls: the extractor: "getter" (timm's FeatureGetterNet over ``forward_intermediates``) or "fx"
            (timm's FeatureGraphNet, an FX graph; its maps are the stages' own NHWC tensors).
        global_pool: "avg" (default) or "" (no pooling: ``forward`` returns the B x H x W x C map).
        pretrained_cfg_overlay: entries replacing those of ``pretrained_cfg``, as in timm; ``file`` (or
            ``state_dict``) is where ``pretrained=True`` takes the weights from.
        **kwargs: any other ``Sequencer`` argument (e.g. ``cell="gru"``, ``union="add"``). None values are ignored,
            as timm ignores them.
    """
    name = resolve_name(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None and k not in _LAYER_CONFIG_ARGS}
    cfg = dict(VARIANTS[name])
    cfg.update(kwargs)
    if num_classes is not None:
        cfg["num_classes"] = num_classes
    if img_size is not None:
        cfg["img_size"] = img_size
    if drop_path_rate is not None:
        cfg["drop_path_rate"] = drop_path_rate
    if global_pool is not None:
        cfg["global_pool"] = global_pool
    cfg["in_chans"] = 3 if in_chans is None else in_chans
    model = Sequencer(**cfg)
    overlay = dict(pretrained_cfg_overlay or {})
    source = overlay.pop("state_dict", None) or overlay.get("file")
    overlay.pop("num_classes", None)  # the loader fits the file's head to the model's (timm's -1 asks the same)
    model.pretrained_cfg = pretrained_cfg_for(name, model.num_classes, cfg.get("img_size"), model.min_input_size)
    model.pretrained_cfg.update(overlay)
    model.default_cfg = model.pretrained_cfg
    model.variant = name
    # What makes this model differ from the registered variant: a seqvision file saved from it records these
    # (weights.save_weights), so that loading the file rebuilds this model, not the stock variant.
    model.model_kwargs = dict(kwargs)

    if checkpoint_path is not None:
        load_weights(model, checkpoint_path, variant_hint=guess_variant)
    elif pretrained and source is not None:
        load_weights(model, source, variant_hint=guess_variant)
    elif pretrained:
        load_pretrained(model, name, cache_dir=cache_dir)

    if features_only:
        return feature_extractor(model, out_indices, output_fmt, feature_cls)
    return model


def feature_extractor(
    model: Sequencer, out_indices: Sequence[int], output_fmt: str | None = None, feature_cls: str | type = "getter"
) -> nn.Module:
    """``model`` wrapped to return its stage outputs ``out_indices`` (``create_model(features_only=True)``), with
    ``feature_info`` and the model's ``pretrained_cfg`` (less the classifier's entries, as timm gives it) so that
    ``timm.data.resolve_data_config`` reads the preprocessing from the wrapper too."""
    if feature_cls in ("getter", FeatureGetterNet):
        output_fmt = output_fmt or "NCHW"
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', not {output_fmt!r}")
        net = FeatureGetterNet(model, out_indices=out_indices, output_fmt=output_fmt)
    elif feature_cls in ("fx", FeatureGraphNet):
        if output_fmt not in (None, "NHWC"):
            raise ValueError(
                "feature_cls='fx' returns the stages' own B x H x W x C maps (output_fmt 'NHWC'); "
                "the default feature_cls='getter' gives NCHW"
            )
        net = FeatureGraphNet(model, out_indices=tuple(out_indices), output_fmt="NHWC")
    else:
        raise ValueError(f"feature_cls must be one of {', '.join(FEATURE_CLASSES)} (timm's names), not {feature_cls!r}")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    net.pretrained_cfg = {k: v for k, v in cfg.items() if k not in ("num_classes", "classifier", "global_pool")}
    net.default_cfg = net.pretrained_cfg
    return net


def guess_variant(sd: Mapping[str, Tensor]) -> str | None:
    """The registered variant whose parameter names and shapes (head aside) match ``sd`` (any key layout), if any."""
    if detect_format(sd) == "authors":
        sd = authors_to_timm(sd)
    want = {k: tuple(v.shape) for k, v in sd.items() if k not in HEAD_KEYS}
    in_chans = sd["stem.proj.weight"].shape[1] if "stem.proj.weight" in sd else 3
    blocks = {m.group(1, 2) for k in want if (m := re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.", k))}
    depths = [sum(1 for s, _ in blocks if int(s) == i) for i in range(1 + max((int(s) for s, _ in blocks), default=-1))]
    stem = want.get("stem.proj.weight")
    for name, cfg in VARIANTS.items():
        if name.endswith("_392") or list(cfg["layers"]) != depths:
            continue  # the block count and the stem rule most variants out before one is built
        if stem is not None and (stem[0], stem[-1]) != (cfg["embed_dims"][0], cfg["patch_sizes"][0]):
            continue
        with torch.device("meta"):
            candidate = Sequencer(**dict(cfg, in_chans=in_chans))
        have = {k: tuple(v.shape) for k, v in candidate.state_dict().items() if k not in HEAD_KEYS}
        if have == want:
            return name
    return None


def load_pretrained(model: nn.Module, name: str, cache_dir: str | os.PathLike | None = None) -> dict:
    """Load the published ImageNet-1K weights of variant ``name`` (downloaded once into torch's hub cache, or into
    ``cache_dir``)."""
    url = PRETRAINED_URLS.get(name)
    if not url:
        raise CheckpointError(
            f"no published weights for {name}; train it or pass checkpoint_path= (published: "
            f"{', '.join(PRETRAINED_URLS)})"
        )
    return load_from_url(model, url, cache_dir)
