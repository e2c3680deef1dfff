"""Everything needed to use a trained model outside training: rebuild it from a checkpoint, preprocess,
name its classes, quantise it.

A checkpoint written by ``seqvision train`` (or a seqvision .safetensors) records the variant, extra
model arguments, class names and preprocessing (``seqvision.weights.INFO_KEYS``); published files of the
authors or timm record none of that, so the variant is recognised from the tensor shapes instead.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from timm.data import ImageNetInfo, resolve_data_config
from torch import nn

from .errors import CheckpointError, UnknownModelError
from .models import create_model, resolve_name
from .weights import HEAD_KEYS, guess_variant, load_weights, read_checkpoint


@dataclass
class LoadedModel:
    model: nn.Module
    name: str
    class_names: list[str]
    data_config: dict[str, Any] = field(default_factory=dict)  # timm's: input_size, mean, std, crop_pct, ...


def default_class_names(num_classes: int) -> list[str]:
    """ImageNet-1k names for 1000 classes (from timm's offline tables), else "0", "1", ..."""
    if num_classes == 1000:
        info = ImageNetInfo()
        return [info.index_to_description(i).split(",")[0] for i in range(1000)]
    return [str(i) for i in range(num_classes)]


def load_model(
    checkpoint: str | os.PathLike | None = None,
    model_name: str | None = None,
    device: str | torch.device = "cpu",
    pretrained: bool = False,
) -> LoadedModel:
    """Rebuild the model ``checkpoint`` was made for, load it in eval mode and resolve its preprocessing.

    ``model_name`` is needed only when the file does not say which variant it holds and its shapes
    match no registered variant (e.g. a custom-width model saved by another tool).
    """
    if checkpoint is None:
        if model_name is None:
            raise CheckpointError("give a checkpoint (--checkpoint) or a model name with published weights")
        model = create_model(model_name, pretrained=pretrained)
        return _finish(model, resolve_name(model_name), {}, device)

    sd, info = read_checkpoint(checkpoint)
    name = model_name or info.get("model_name") or guess_variant(sd)
    if name is None:
        raise CheckpointError(f"cannot tell which model {checkpoint} is for: pass the variant name (--model)")
    kwargs = dict(info.get("model_kwargs") or {})
    head = sd.get("head.fc.weight")
    kwargs["num_classes"] = head.shape[0] if head is not None else 0
    if model_name and info.get("model_name") and resolve_name(model_name) != resolve_name(info["model_name"]):
        raise CheckpointError(f"{checkpoint} holds a {info['model_name']}, not a {model_name}")
    model = create_model(name, **kwargs)
    load_weights(model, {k: v for k, v in sd.items() if head is not None or k not in HEAD_KEYS})
    return _finish(model, resolve_name(name), info, device)


def load_any_model(
    name: str | None,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    pretrained: bool = False,
    **timm_kwargs: Any,
) -> LoadedModel:
    """A seqvision variant (any checkpoint format, see ``load_model``) or, for comparison, any timm model
    (``timm.create_model``; its weights from ``checkpoint`` or ``pretrained``)."""
    if name is None:
        return load_model(checkpoint, None, device, pretrained=pretrained)
    if checkpoint is None and not pretrained:
        warnings.warn(f"{name} has random weights: pass --checkpoint or --pretrained", UserWarning, stacklevel=2)
    try:
        resolve_name(name)
        return load_model(checkpoint, name, device, pretrained=pretrained)
    except UnknownModelError:
        if not timm.is_model(name):
            raise
    info: dict[str, Any] = {}
    if checkpoint is not None:
        sd, info = read_checkpoint(checkpoint)
        kwargs = {**(info.get("model_kwargs") or {}), **timm_kwargs}
        head = timm.create_model(name, pretrained=False, **kwargs).pretrained_cfg.get("classifier", "")
        head_w = sd.get(f"{head}.weight") if isinstance(head, str) else None
        if head_w is not None:
            kwargs.setdefault("num_classes", head_w.shape[0])
        model = timm.create_model(name, pretrained=False, **kwargs)
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            raise CheckpointError(f"{checkpoint} does not hold {name} weights: {str(e).splitlines()[0]}") from None
    else:
        model = timm.create_model(name, pretrained=pretrained, **timm_kwargs)
    model.eval().to(device)
    names = list(info.get("class_names") or default_class_names(model.num_classes))
    return LoadedModel(model, name, names, resolve_data_config(dict(info.get("data_config") or {}), model=model))


def _finish(model: nn.Module, name: str, info: dict[str, Any], device: str | torch.device) -> LoadedModel:
    model.eval().to(device)
    names = list(info.get("class_names") or default_class_names(getattr(model, "num_classes", 0)))
    data_config = resolve_data_config(dict(info.get("data_config") or {}), model=model)
    return LoadedModel(model, name, names, data_config)


def quantize_dynamic(model: nn.Module) -> nn.Module:
    """int8 weights for every LSTM / GRU / Linear layer, activations quantised on the fly (CPU only).

    The quantised RNNs are not nn.LSTM any more, so the model runs on the reference engine.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")  # torch.ao's dynamic path still works
        return torch.ao.quantization.quantize_dynamic(model.cpu().eval(), {nn.LSTM, nn.GRU, nn.Linear}, torch.qint8)
