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
from torch import Tensor, nn

from .checkpoint_meta import CheckpointMeta, check_against_tensors, model_build_kwargs, read_checkpoint_meta
from .errors import CheckpointError, UnknownModelError
from .images import display_path
from .models import create_model, guess_variant, resolve_name
from .runtime import pick_device
from .weights import HEAD_KEYS, authors_to_timm, detect_format, load_weights


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
    device = pick_device(device)
    if checkpoint is None:
        if model_name is None:
            raise CheckpointError("give a checkpoint (--checkpoint) or a model name with published weights")
        model = create_model(model_name, pretrained=pretrained)
        return _finish(model, resolve_name(model_name), {}, device)

    sd, meta = read_checkpoint_meta(checkpoint)
    if meta.timm_model and model_name in (None, meta.model_name):  # a peer that seqvision train trained
        return _load_timm(meta.model_name, sd, meta, checkpoint, device)
    name = model_name or meta.model_name or guess_variant(sd)
    if name is None:
        raise CheckpointError(f"cannot tell which model {checkpoint} is for: pass the variant name (--model)")
    if (
        model_name
        and meta.model_name
        and (meta.timm_model or resolve_name(model_name) != resolve_name(meta.model_name))
    ):
        raise CheckpointError(f"{checkpoint} holds a {meta.model_name}, not a {model_name}")
    native = authors_to_timm(sd) if detect_format(sd) == "authors" else sd
    # The shapes are compared only when the metadata names the model; for a bare file, load_weights says
    # what does not fit the --model variant.
    check_against_tensors(meta, native, str(checkpoint), resolve_name(name) if meta.describes_model else None)
    head = native.get("head.fc.weight")
    model = create_model(name, **model_build_kwargs(meta, native))
    try:
        load_weights(
            model,
            {k: v for k, v in native.items() if head is not None or k not in HEAD_KEYS},
            variant_hint=guess_variant,
        )
    except CheckpointError as e:  # it names the weights "state dict": name the file instead
        raise CheckpointError(str(e).replace("state dict", str(checkpoint), 1)) from None
    return _finish(model, resolve_name(name), meta.to_info(), device)


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
    device = pick_device(device)
    if checkpoint is None:
        model = timm.create_model(name, pretrained=pretrained, **timm_kwargs).eval().to(device)
        names = default_class_names(model.num_classes)
        return LoadedModel(model, name, names, resolve_data_config({}, model=model))
    sd, meta = read_checkpoint_meta(checkpoint)
    return _load_timm(name, sd, meta, checkpoint, device, **timm_kwargs)


def _load_timm(
    name: str, sd: dict[str, Tensor], meta: CheckpointMeta, checkpoint: Any, device: torch.device, **kwargs: Any
) -> LoadedModel:
    """The timm model ``name`` with the weights ``sd``; the file's model_kwargs apply when it holds that model."""
    info = meta.to_info()
    kwargs = {**(meta.model_kwargs if meta.model_name == name else {}), **kwargs}
    head = timm.create_model(name, pretrained=False, **kwargs).pretrained_cfg.get("classifier", "")
    head_w = sd.get(f"{head}.weight") if isinstance(head, str) else None
    if head_w is not None:
        kwargs.setdefault("num_classes", head_w.shape[0])
    model = timm.create_model(name, pretrained=False, **kwargs)
    _load_timm_weights(model, sd, checkpoint, name, info)
    model.eval().to(device)
    names = list(info.get("class_names") or default_class_names(model.num_classes))
    return LoadedModel(model, name, names, resolve_data_config(dict(info.get("data_config") or {}), model=model))


def _load_timm_weights(model: nn.Module, sd: dict[str, Tensor], checkpoint: Any, name: str, info: dict) -> None:
    """Load ``sd`` into the timm model ``name``; a one-line CheckpointError when it is another model's."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        found = ((missing, "missing keys"), (unexpected, "unexpected keys"), (shapes, "shape mismatches"))
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for v, what in found if v]
        holds = info.get("model_name")
        hint = f"; it holds a {holds}: leave out --model or pass --model {holds}" if holds else ""
        raise CheckpointError(f"{display_path(checkpoint)} does not fit {name}: {', '.join(parts)}{hint}")
    names = info.get("class_names")
    if names is not None and len(names) != getattr(model, "num_classes", len(names)):
        raise CheckpointError(
            f"{display_path(checkpoint)}: checkpoint metadata class_names lists {len(names)} names "
            f"for a {model.num_classes}-class {name}"
        )
    model.load_state_dict(sd)


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
