"""seqvision's models in timm's registry, so that scripts written for timm run on them unchanged but for the name.

``register_timm()`` registers every variant as ``seqvision_<variant>`` (``seqvision_sequencer2d_s``, ...): a prefix,
because timm has its own ``sequencer2d_s`` / ``_m`` / ``_l`` and a model name cannot hold the ``.`` of a pretrained
tag or the ``:`` of a source. timm 1.0 has no plugin hook that would find them on its own, hence the explicit call.
After it, ``timm.create_model("seqvision_sequencer2d_s", ...)`` builds what ``seqvision.create_model("sequencer2d_s",
...)`` builds (same arguments, ``pretrained=True`` included) and ``timm.list_models("seqvision_*")`` lists them.
"""

import sys
from collections.abc import Callable
from typing import Any

from timm.models import is_model, register_model
from torch import nn

from .factory import create_model, list_models
from .sequencer import pretrained_cfg_for

PREFIX = "seqvision_"
# timm's register_model reads each name's pretrained_cfg from the registering module's ``default_cfgs``.
default_cfgs: dict[str, dict[str, Any]] = {}


def timm_name(variant: str) -> str:
    """The name timm knows ``variant`` by after ``register_timm()``: ``"seqvision_" + variant``."""
    return PREFIX + variant


def _overlay(name: str, pretrained_cfg: Any, overlay: dict | None) -> dict | None:
    """timm's ``pretrained_cfg`` (a tag, a dict or a PretrainedCfg) and ``pretrained_cfg_overlay`` as one overlay."""
    if isinstance(pretrained_cfg, str):
        if pretrained_cfg:
            raise ValueError(f"{name} has no pretrained tag {pretrained_cfg!r}: use {name} without a '.tag'")
        pretrained_cfg = None
    merged = dict(pretrained_cfg.to_dict() if hasattr(pretrained_cfg, "to_dict") else pretrained_cfg or {})
    merged.update(overlay or {})
    return merged or None


def _entrypoint(variant: str) -> Callable[..., nn.Module]:
    name = timm_name(variant)

    def entrypoint(
        pretrained: bool = False, pretrained_cfg: Any = None, pretrained_cfg_overlay: dict | None = None, **kwargs: Any
    ) -> nn.Module:
        overlay = _overlay(name, pretrained_cfg, pretrained_cfg_overlay)
        return create_model(variant, pretrained=pretrained, pretrained_cfg_overlay=overlay, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"seqvision's {variant}: seqvision.create_model({variant!r}, ...)."
    return entrypoint


def register_timm() -> list[str]:
    """Register every seqvision variant with timm as ``seqvision_<variant>``; returns the names. Calling it again
    changes nothing."""
    names = []
    module = sys.modules[__name__]
    for variant in list_models():
        name = timm_name(variant)
        if not is_model(name):
            default_cfgs[name] = pretrained_cfg_for(variant)
            setattr(module, name, _entrypoint(variant))
            register_model(getattr(module, name))
        names.append(name)
    return names
