"""What a checkpoint says about itself (the variant, its arguments, class names, preprocessing), parsed into
a typed, checked ``CheckpointMeta`` before anything uses it.

A checkpoint is input a user downloads or is handed, so its metadata is untrusted: it decides which model is
built and how large, how images are preprocessed and what is printed. ``parse_metadata`` checks every field
for type and size (an unknown field, or one that would redirect loading to another file or a download, is
refused); ``check_against_tensors`` checks that the fields agree with each other and with the tensors (the
model they describe has exactly the file's parameter shapes). Each failure is one ``CheckpointError`` line
that names the file and the field.

Top-level keys other than ``INFO_KEYS`` are ignored: other tools write their own (safetensors' ``format``,
a training checkpoint's optimiser state); inside ``model_kwargs`` and ``data_config``, which are seqvision's,
every key must be known. A checkpoint of a timm model that ``seqvision train`` trained (a peer architecture)
names it in ``model_name``; its ``model_kwargs`` are timm's, checked for plain values and size only, and its
tensors are checked by the timm model when it is built.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from torch import Tensor

from .errors import CheckpointError, UnknownModelError
from .images import CROP_PCT_RANGE, MAX_IMG_SIZE
from .models import VARIANTS, create_model, guess_variant, resolve_name
from .weights import INFO_KEYS, authors_to_timm, detect_format, read_stored, save_weights

# Bounds on the stored text, checked before it is parsed.
_MAX_CHARS = {
    "model_name": 200,
    "epoch": 20,
    "model_kwargs": 64 << 10,
    "data_config": 64 << 10,
    "class_names": 64 << 20,
}
MAX_CLASSES = 1_000_000
MAX_CLASS_NAME = 1000  # characters
MAX_CHANNELS = 64
MAX_STAGES = 8
MAX_DEPTH = 64  # blocks in one stage
MAX_WIDTH = 8192  # embedding or hidden size
MAX_PATCH = 64
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash", "border")
# create_model() arguments that would make loading read another file, download, or return something else.
_REDIRECTS = {
    "checkpoint_path": "would load another file",
    "pretrained": "would download published weights",
    "pretrained_cfg": "would override the preprocessing outside data_config",
    "pretrained_cfg_overlay": "would override the preprocessing outside data_config",
    "features_only": "would build a feature extractor instead of a classifier",
    "out_indices": "would build a feature extractor instead of a classifier",
    "output_fmt": "would build a feature extractor instead of a classifier",
}


class _Bad(Exception):
    """A field that fails its check: (field, what is wrong), turned into a CheckpointError by the caller."""


@dataclass(frozen=True)
class CheckpointMeta:
    """The checked metadata of one checkpoint; ``None`` / empty where the file records nothing."""

    model_name: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    data_config: dict[str, Any] = field(default_factory=dict)
    epoch: int | None = None

    def to_info(self) -> dict[str, Any]:
        """The recorded fields as the plain dict ``read_checkpoint`` returns."""
        info: dict[str, Any] = {}
        if self.model_name is not None:
            info["model_name"] = self.model_name
        if self.model_kwargs:
            info["model_kwargs"] = dict(self.model_kwargs)
        if self.class_names is not None:
            info["class_names"] = list(self.class_names)
        if self.data_config:
            info["data_config"] = dict(self.data_config)
        if self.epoch is not None:
            info["epoch"] = self.epoch
        return info

    @property
    def timm_model(self) -> bool:
        """Whether the file holds a timm model (a name timm knows that is not a seqvision variant)."""
        return self.model_name is not None and not _is_variant(self.model_name)

    @property
    def describes_model(self) -> bool:
        """Whether the metadata says which model the tensors are (a variant name or its arguments)."""
        return self.model_name is not None or bool(self.model_kwargs)


def read_checkpoint_meta(path: str | os.PathLike) -> tuple[dict[str, Tensor], CheckpointMeta]:
    """A checkpoint's state dict (``seqvision.weights.read_stored``: any format, unwrapped, loaded safely) and its
    recorded fields as a checked ``CheckpointMeta``."""
    stored = read_stored(path)
    return stored.state_dict, parse_metadata(stored.recorded, str(path), encoded=stored.encoded)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``read_checkpoint_meta`` with the checked fields as a plain dict (``CheckpointMeta.to_info``)."""
    sd, meta = read_checkpoint_meta(path)
    return sd, meta.to_info()


def parse_metadata(raw: Mapping[str, Any], source: str, encoded: bool = False) -> CheckpointMeta:
    """Check the ``INFO_KEYS`` of ``raw`` and return them typed; ``CheckpointError`` naming the field if not.

    ``encoded``: the values are safetensors metadata strings (JSON text for ``JSON_KEYS``, the epoch as
    digits) rather than the Python objects of a torch checkpoint.
    """
    try:
        values = {k: _decode(k, raw[k]) if encoded else raw[k] for k in INFO_KEYS if k in raw}
        name = _model_name(values["model_name"]) if "model_name" in values else None
        timm_model = name is not None and not _is_variant(name)
        return CheckpointMeta(
            model_name=name,
            model_kwargs=_model_kwargs(values["model_kwargs"], timm_model) if "model_kwargs" in values else {},
            class_names=_class_names(values["class_names"]) if "class_names" in values else None,
            data_config=_data_config(values["data_config"]) if "data_config" in values else {},
            epoch=_int(0, 1 << 40)(values["epoch"], "epoch") if "epoch" in values else None,
        )
    except _Bad as e:
        field_name, problem = e.args
        raise CheckpointError(f"{source}: checkpoint metadata {field_name} {problem}") from None


def model_build_kwargs(meta: CheckpointMeta, sd: Mapping[str, Any]) -> dict[str, Any]:
    """``create_model`` arguments for the model ``meta`` describes, sized by the tensors: the classifier
    from ``head.fc.weight``, the input channels from the stem, the input size from ``data_config``."""
    kwargs = dict(meta.model_kwargs)
    head = sd.get("head.fc.weight")
    kwargs["num_classes"] = int(head.shape[0]) if head is not None else 0
    stem = sd.get("stem.proj.weight")
    if "in_chans" not in kwargs and stem is not None and stem.dim() == 4:
        kwargs["in_chans"] = int(stem.shape[1])
    size = meta.data_config.get("input_size")
    if "img_size" not in kwargs and size is not None:
        kwargs["img_size"] = tuple(size[1:])  # what a position embedding is sized for
    return kwargs


def check_against_tensors(meta: CheckpointMeta, sd: Mapping[str, Any], source: str, name: str | None) -> None:
    """``CheckpointError`` naming the field when ``meta`` contradicts itself or the tensors ``sd`` (timm key
    layout): the class names against the classifier, the channels against the stem, and (unless ``name`` is
    None) the variant ``name`` built with ``meta.model_kwargs`` against every parameter shape."""
    if meta.timm_model:
        return  # a timm model's keys are its own; building it checks them
    try:
        _check_sizes(meta, sd)
        if name is not None:
            _check_shapes(meta, sd, name)
    except _Bad as e:
        field_name, problem = e.args
        raise CheckpointError(f"{source}: checkpoint metadata {field_name} {problem}") from None


# -- decoding ------------------------------------------------------------------------------------------------
def _decode(key: str, value: Any) -> Any:
    if not isinstance(value, str):
        raise _Bad(key, f"must be text in safetensors metadata, got {type(value).__name__}")
    if len(value) > _MAX_CHARS[key]:
        raise _Bad(key, f"is {len(value):,} characters long, more than the {_MAX_CHARS[key]:,} allowed")
    if key == "model_name":
        return value
    if key == "epoch":
        if not value.strip().isdigit():
            raise _Bad(key, f"must be a whole number, got {_short(value)}")
        return int(value)
    try:
        return json.loads(value)
    except RecursionError:
        raise _Bad(key, "is JSON nested too deeply") from None
    except ValueError as e:
        raise _Bad(key, f"is not valid JSON ({str(e).splitlines()[0][:80]})") from None


# -- field checks ---------------------------------------------------------------------------------------------
Check = Callable[[Any, str], Any]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _int(lo: int, hi: int) -> Check:
    def check(v: Any, name: str) -> int:
        if not _is_int(v) or not lo <= v <= hi:
            raise _Bad(name, f"must be a whole number from {lo:,} to {hi:,}, got {_short(v)}")
        return int(v)

    return check


def _number(lo: float, hi: float, above: bool = False) -> Check:
    def check(v: Any, name: str) -> float:
        if not _is_number(v) or not (lo < v if above else lo <= v) or v > hi:
            low = f"above {lo}" if above else f"from {lo}"
            raise _Bad(name, f"must be a number {low} to {hi}, got {_short(v)}")
        return float(v)

    return check


def _bool(v: Any, name: str) -> bool:
    if not isinstance(v, bool):
        raise _Bad(name, f"must be true or false, got {_short(v)}")
    return v


def _choice(*options: str) -> Check:
    def check(v: Any, name: str) -> str:
        if v not in options or not isinstance(v, str):
            raise _Bad(name, f"must be one of {', '.join(options)}, got {_short(v)}")
        return v

    return check


def _list(item: Check, min_len: int, max_len: int) -> Check:
    def check(v: Any, name: str) -> list:
        if not isinstance(v, (list, tuple)) or not min_len <= len(v) <= max_len:
            n = f"{min_len}" if min_len == max_len else f"{min_len} to {max_len}"
            raise _Bad(name, f"must be a list of {n} values, got {_short(v)}")
        return [item(x, f"{name}[{i}]") for i, x in enumerate(v)]

    return check


def _img_size(v: Any, name: str) -> int | tuple[int, int]:
    side = _int(1, MAX_IMG_SIZE)
    if _is_int(v):
        return side(v, name)
    return tuple(_list(side, 2, 2)(v, name))


_STAGE_LIST = {
    "layers": _list(_int(0, MAX_DEPTH), 1, MAX_STAGES),
    "patch_sizes": _list(_int(1, MAX_PATCH), 1, MAX_STAGES),
    "embed_dims": _list(_int(1, MAX_WIDTH), 1, MAX_STAGES),
    "hidden_sizes": _list(_int(1, MAX_WIDTH), 1, MAX_STAGES),
}
MODEL_KWARGS: dict[str, Check] = {
    **_STAGE_LIST,
    "mlp_ratio": _number(0.0, 64.0, above=True),
    "mixer": _choice("1d", "2d"),
    "cell": _choice("lstm", "gru", "rnn"),
    "bidirectional": _bool,
    "union": _choice("cat", "add", "vertical", "horizontal"),
    "with_fc": _bool,
    "pos_embed": _bool,
    "shuffle_tokens": _bool,
    "num_classes": _int(0, MAX_CLASSES),
    "in_chans": _int(1, MAX_CHANNELS),
    "img_size": _img_size,
    "drop_rate": _number(0.0, 1.0),
    "drop_path_rate": _number(0.0, 1.0),
    "drop_path_schedule": _choice("linear", "constant"),
    "global_pool": _choice("avg", ""),
}
DATA_CONFIG: dict[str, Check] = {
    "input_size": lambda v, n: tuple(_list(_int(1, MAX_IMG_SIZE), 3, 3)(v, n)),
    "interpolation": _choice(*INTERPOLATIONS),
    "mean": lambda v, n: tuple(_list(_number(-1e3, 1e3), 1, MAX_CHANNELS)(v, n)),
    "std": lambda v, n: tuple(_list(_number(0.0, 1e3, above=True), 1, MAX_CHANNELS)(v, n)),
    "crop_pct": _number(*CROP_PCT_RANGE),
    "crop_mode": _choice(*CROP_MODES),
}


def _is_variant(name: str) -> bool:
    try:
        resolve_name(name)
    except UnknownModelError:
        return False
    return True


def _model_name(v: Any) -> str:
    if not isinstance(v, str) or not v or len(v) > _MAX_CHARS["model_name"]:
        raise _Bad("model_name", f"must be a variant name, got {_short(v)}")
    if not _is_variant(v) and not timm.is_model(v):
        raise _Bad(
            "model_name",
            f"{_short(v)} is neither a registered variant (`seqvision models` lists them) nor a timm model",
        )
    return v


def _plain(v: Any, name: str, depth: int = 0) -> Any:
    """A timm model argument: a number, flag, short text, or a short list of those."""
    if isinstance(v, bool) or _is_int(v) or (isinstance(v, float) and math.isfinite(v)) or v is None:
        return v
    if isinstance(v, str) and len(v) <= 200:
        return v
    if isinstance(v, (list, tuple)) and len(v) <= 64 and depth == 0:
        return [_plain(x, f"{name}[{i}]", 1) for i, x in enumerate(v)]
    raise _Bad(name, f"must be a number, flag, short text or a short list of those, got {_short(v)}")


def _mapping(v: Any, name: str, spec: Mapping[str, Check]) -> dict[str, Any]:
    if not isinstance(v, Mapping):
        raise _Bad(name, f"must be a mapping of names to values, got {type(v).__name__}")
    out = {}
    for key, value in v.items():
        where = f"{name}.{key}" if isinstance(key, str) and key.isprintable() and len(key) < 60 else name
        if key in _REDIRECTS and name == "model_kwargs":
            raise _Bad(where, f"{_REDIRECTS[key]}: a checkpoint may not ask for that; remove the field")
        if key not in spec:
            known = ", ".join(spec)
            raise _Bad(where, f"is not a known field ({_short(key)}; known: {known})")
        out[key] = spec[key](value, where)
    return out


def _model_kwargs(v: Any, timm_model: bool = False) -> dict[str, Any]:
    if timm_model:
        if not isinstance(v, Mapping) or len(v) > 64 or not all(isinstance(k, str) and k.isidentifier() for k in v):
            raise _Bad("model_kwargs", f"must be a mapping of at most 64 argument names to values, got {_short(v)}")
        return _mapping(v, "model_kwargs", {k: _plain for k in v})
    kwargs = _mapping(v, "model_kwargs", MODEL_KWARGS)
    lengths = {k: len(kwargs[k]) for k in _STAGE_LIST if k in kwargs}
    if len(set(lengths.values())) > 1:
        raise _Bad("model_kwargs", f"stage lists differ in length ({lengths}): one entry per stage is needed")
    return kwargs


def _class_names(v: Any) -> list[str]:
    if not isinstance(v, (list, tuple)):
        raise _Bad("class_names", f"must be a list of names, got {type(v).__name__} {_short(v)}")
    if len(v) > MAX_CLASSES:
        raise _Bad("class_names", f"holds {len(v):,} names, more than {MAX_CLASSES:,}")
    for i, name in enumerate(v):
        if not isinstance(name, str) or len(name) > MAX_CLASS_NAME or not name.isprintable():
            raise _Bad(
                f"class_names[{i}]",
                f"must be printable text of at most {MAX_CLASS_NAME} characters, got {_short(name)}",
            )
    return list(v)


def _data_config(v: Any) -> dict[str, Any]:
    cfg = _mapping(v, "data_config", DATA_CONFIG)
    channels = cfg["input_size"][0] if "input_size" in cfg else None
    for key in ("mean", "std"):
        if key in cfg and channels is not None and len(cfg[key]) not in (1, channels):
            raise _Bad(f"data_config.{key}", f"has {len(cfg[key])} values for {channels} input channels")
    return cfg


# -- agreement with the tensors -------------------------------------------------------------------------------
def _check_sizes(meta: CheckpointMeta, sd: Mapping[str, Any]) -> None:
    head = sd.get("head.fc.weight")
    classes = int(head.shape[0]) if head is not None and head.dim() == 2 else 0
    if meta.class_names is not None and len(meta.class_names) != classes:
        where = f"a {classes}-class classifier" if classes else "no classifier"
        raise _Bad("class_names", f"lists {len(meta.class_names)} names but the tensors hold {where}")
    n = meta.model_kwargs.get("num_classes")
    if n is not None and n != classes:
        raise _Bad("model_kwargs.num_classes", f"is {n} but the tensors hold a {classes}-class classifier")
    stem = sd.get("stem.proj.weight")
    chans = int(stem.shape[1]) if stem is not None and stem.dim() == 4 else None
    if chans is None:
        return
    if meta.model_kwargs.get("in_chans", chans) != chans:
        raise _Bad("model_kwargs.in_chans", f"is {meta.model_kwargs['in_chans']} but the stem takes {chans} channels")
    size = meta.data_config.get("input_size")
    if size is not None and size[0] != chans:
        raise _Bad("data_config.input_size", f"has {size[0]} channels but the stem takes {chans}")
    for key in ("mean", "std"):
        values = meta.data_config.get(key)
        if values is not None and len(values) not in (1, chans):
            raise _Bad(f"data_config.{key}", f"has {len(values)} values but the stem takes {chans} channels")


def _check_shapes(meta: CheckpointMeta, sd: Mapping[str, Any], name: str) -> None:
    kwargs = model_build_kwargs(meta, sd)
    have = {k: tuple(v.shape) for k, v in sd.items()}
    try:
        own = _shapes(name, kwargs)
    except (ValueError, TypeError, RuntimeError) as e:
        own, build_error = None, str(e).splitlines()[0][:120]
    if own == have:
        return
    # Which field is wrong: the variant (another one fits with these arguments) or the arguments.
    fits = _variant_that_fits(kwargs, have, exclude=name)
    blame = "model_name" if fits or not meta.model_kwargs else "model_kwargs"
    described = f" ({name}" + (f" with {_short(meta.model_kwargs, 80)})" if meta.model_kwargs else ")")
    if fits:
        hint = f"; the tensors are a {fits}" + (" with these model_kwargs" if meta.model_kwargs else "")
    else:
        guess = guess_variant(sd)
        hint = f"; the tensors are a plain {guess}" if guess else ""
    if own is None:
        raise _Bad(blame, f"does not describe a model that can be built{described}: {build_error}{hint}")
    raise _Bad(blame, f"does not match the tensors{described}: {_first_difference(own, have)}{hint}")


def _shapes(name: str, kwargs: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = create_model(name, **kwargs)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _variant_that_fits(kwargs: Mapping[str, Any], have: Mapping[str, tuple], exclude: str) -> str | None:
    for variant in VARIANTS:  # registered order: the base variants first
        if variant == exclude:
            continue
        try:
            if _shapes(variant, kwargs) == have:
                return variant
        except (ValueError, TypeError, RuntimeError):
            continue
    return None


def _first_difference(own: Mapping[str, tuple], have: Mapping[str, tuple]) -> str:
    shapes = [k for k in own if k in have and own[k] != have[k]]
    if shapes:
        return f"{shapes[0]} is {have[shapes[0]]} in the file, {own[shapes[0]]} in that model"
    missing = [k for k in own if k not in have]
    if missing:
        return f"the file lacks {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    extra = [k for k in have if k not in own]
    return f"the file has {extra[0]}, which that model lacks" + (f" (+{len(extra) - 1})" if len(extra) > 1 else "")


# -- conversion -----------------------------------------------------------------------------------------------------
def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, to: str = "seqvision") -> dict:
    """Read ``src`` in any supported format and write it to ``dst`` in format ``to``."""
    sd, meta = read_checkpoint_meta(src)
    source_fmt = detect_format(sd)
    # Class names, channels and preprocessing that contradict the tensors are not passed on. The variant's
    # shapes are not compared: a file may name its variant without the model_kwargs it was built with.
    check_against_tensors(meta, authors_to_timm(sd) if source_fmt == "authors" else sd, str(src), None)
    info = meta.to_info()
    if "model_name" not in info and (variant := guess_variant(sd)):
        info["model_name"] = variant
    info.pop("epoch", None)
    save_weights(sd, dst, to, info=info)
    return {"from": source_fmt, "to": to, "tensors": len(sd), "variant": info.get("model_name")}
