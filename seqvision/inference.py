"""Everything needed to use a trained model outside training: rebuild it from a checkpoint, preprocess,
name its classes, quantise it.

A checkpoint written by ``seqvision train`` (or a seqvision .safetensors) records the variant, extra
model arguments, class names and preprocessing (``seqvision.weights.INFO_KEYS``); published files of the
authors or timm record none of that, so the variant is recognised from the tensor shapes instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.data import resolve_data_config
from torch import nn

from .checkpoint_meta import check_against_tensors, model_build_kwargs
from .errors import CheckpointError, UserError
from .models import create_model, resolve_name
from .weights import HEAD_KEYS, authors_to_timm, detect_format, guess_variant, load_weights, read_checkpoint_meta


@dataclass
class LoadedModel:
    model: nn.Module
    name: str
    class_names: list[str]
    data_config: dict[str, Any] = field(default_factory=dict)  # timm's: input_size, mean, std, crop_pct, ...


def default_class_names(num_classes: int) -> list[str]:
    """ImageNet-1k names for 1000 classes (from timm's offline tables), else "0", "1", ..."""
    if num_classes == 1000:
        from timm.data import ImageNetInfo

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
    device = check_device(device)
    if checkpoint is None:
        if model_name is None:
            raise CheckpointError("give a checkpoint (--checkpoint) or a model name with published weights")
        model = create_model(model_name, pretrained=pretrained)
        return _finish(model, resolve_name(model_name), {}, device)

    sd, meta = read_checkpoint_meta(checkpoint)
    name = model_name or meta.model_name or guess_variant(sd)
    if name is None:
        raise CheckpointError(f"cannot tell which model {checkpoint} is for: pass the variant name (--model)")
    if model_name and meta.model_name and resolve_name(model_name) != resolve_name(meta.model_name):
        raise CheckpointError(f"{checkpoint} holds a {meta.model_name}, not a {model_name}")
    native = authors_to_timm(sd) if detect_format(sd) == "authors" else sd
    # The shapes are compared only when the metadata names the model; for a bare file, load_weights says
    # what does not fit the --model variant.
    check_against_tensors(meta, native, str(checkpoint), resolve_name(name) if meta.describes_model else None)
    head = native.get("head.fc.weight")
    model = create_model(name, **model_build_kwargs(meta, native))
    try:
        load_weights(model, {k: v for k, v in native.items() if head is not None or k not in HEAD_KEYS})
    except CheckpointError as e:  # it names the weights "state dict": name the file instead
        raise CheckpointError(str(e).replace("state dict", str(checkpoint), 1)) from None
    return _finish(model, resolve_name(name), meta.to_info(), device)


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device that exists here; a one-line UserError for a name torch does not know
    or a device this machine lacks (``cuda`` without CUDA, ``cuda:3`` with two GPUs)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise UserError(f"unknown device {str(device)!r} ({str(e).splitlines()[0]}); use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None) if dev.type in ("cuda", "mps", "xpu") else None
    if backend is None or not backend.is_available():
        raise UserError(f"device {dev} was asked for but {dev.type} is not available here; use --device cpu")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if dev.index is not None and dev.index >= count:
        raise UserError(f"device {dev} was asked for but this machine has {count} {dev.type} device(s)")
    return dev


def _finish(model: nn.Module, name: str, info: dict[str, Any], device: str | torch.device) -> LoadedModel:
    model.eval().to(device)
    names = list(info.get("class_names") or default_class_names(getattr(model, "num_classes", 0)))
    data_config = resolve_data_config(dict(info.get("data_config") or {}), model=model)
    return LoadedModel(model, name, names, data_config)


def quantize_dynamic(model: nn.Module) -> nn.Module:
    """int8 weights for every LSTM / GRU / Linear layer, activations quantised on the fly (CPU only).

    The quantised RNNs are not nn.LSTM any more, so the model runs on the reference engine.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")  # torch.ao's dynamic path still works
        return torch.ao.quantization.quantize_dynamic(model.cpu().eval(), {nn.LSTM, nn.GRU, nn.Linear}, torch.qint8)
