"""Checkpoint formats: read, detect, convert and load the authors', timm's and seqvision's weights.

Three layouts of the same tensors (see shared/reference/sequencer.md, Sec. 3):

- ``authors``: ``blocks.{stage}.{block}.*``, the downsampler at the END of a stage as
  ``blocks.{s}.{depth_s}.down.*``, classifier ``head.*`` (github.com/okojoalg/sequencer, .pth).
- ``timm``: ``stages.{s}.blocks.{b}.*``, the downsampler at the START of the next stage as
  ``stages.{s+1}.downsample.down.*``, classifier ``head.fc.*`` (.safetensors or .pth).
- ``seqvision``: timm's key layout in a .safetensors file whose metadata names the variant.

seqvision models use timm's key layout natively, so only the authors' layout needs renaming.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import urllib.error
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .errors import CheckpointError
from .files import atomic_write

FORMATS = ("seqvision", "timm", "authors")
HEAD_KEYS = ("head.fc.weight", "head.fc.bias")
_WRAPPER_KEYS = ("state_dict", "model", "module")
_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
# What a checkpoint may record besides the weights, so that it can be used without the training config: the
# variant name, extra create_model() arguments, the class names and the preprocessing. Stored as read here; checked
# by seqvision.checkpoint_meta before anything uses them.
INFO_KEYS = ("model_name", "model_kwargs", "class_names", "data_config", "epoch")
JSON_KEYS = ("model_kwargs", "class_names", "data_config")  # JSON text in safetensors metadata
_log = logging.getLogger(__name__)


# -- reading -----------------------------------------------------------------------------------------
def _file_kind(path: Path) -> str | None:
    """What the first bytes say a file is: "zip" (torch.save), "pickle" (legacy torch.save), "safetensors"."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80":  # pickle protocol 2+ opcode, how torch.save's legacy format starts
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{":  # 8-byte little-endian header length, then the JSON header
        return "safetensors"
    return None


@dataclass(frozen=True)
class StoredCheckpoint:
    """A checkpoint file's tensors and its recorded fields exactly as stored: not yet checked
    (``seqvision.checkpoint_meta.read_checkpoint`` checks them); ``encoded``: safetensors metadata text."""

    state_dict: dict[str, Tensor]
    recorded: dict[str, Any]
    encoded: bool


def read_stored(path: str | os.PathLike) -> StoredCheckpoint:
    """Read a state dict and what the file records about it (``INFO_KEYS``) from .safetensors or .pth.

    Training checkpoints that wrap the weights under ``model`` / ``state_dict`` are unwrapped, and
    ``module.`` / ``_orig_mod.`` prefixes are removed. Everything is loaded with ``weights_only=True``, so a
    pickle that would run code is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the file was not written completely")
    raw: dict[str, Any] = {}
    kind = _file_kind(path)
    if kind is None and path.suffix != ".safetensors":
        raise CheckpointError(
            f"cannot read {path}: not a checkpoint (neither a PyTorch .pth/.pt file nor safetensors); "
            "pass the weights file itself"
        )
    encoded = path.suffix == ".safetensors" or kind == "safetensors"
    if encoded:
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = {k: v for k, v in (f.metadata() or {}).items() if k in INFO_KEYS}
            obj: object = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            reason = _first_line(e)
            raise CheckpointError(f"cannot read {path}: truncated or corrupt safetensors file ({reason})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"cannot read {path}: truncated or corrupt checkpoint ({_first_line(e)})") from None
        except Exception as e:  # pickle.UnpicklingError and friends from weights_only loading
            raise CheckpointError(f"cannot read {path} safely with weights_only=True ({_first_line(e)})") from None
        if isinstance(obj, Mapping):
            raw = {k: obj[k] for k in INFO_KEYS if k in obj}
    return StoredCheckpoint(unwrap_state_dict(obj, str(path)), raw, encoded)


def unwrap_state_dict(obj: object, source: str = "checkpoint") -> dict[str, Tensor]:
    """The tensor dict inside a checkpoint object, without DDP / torch.compile prefixes."""
    for _ in range(3):  # e.g. {"model": {"state_dict": ...}}
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is not None and not any(isinstance(v, Tensor) for v in obj.values()):
                obj = inner
                continue
        break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source} holds no state dict (found {type(obj).__name__})")
    sd = {}
    for k, v in obj.items():
        if not isinstance(v, Tensor):
            continue
        for prefix in _PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix) :]
        sd[k] = v
    if not sd:
        raise CheckpointError(f"{source} holds no tensors")
    return sd


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


# -- formats and conversion --------------------------------------------------------------------------
def detect_format(sd: Mapping[str, Tensor]) -> str:
    """``"authors"`` or ``"timm"`` (seqvision's native layout is timm's), from the key layout."""
    if any(k.startswith("stages.") for k in sd):
        return "timm"
    if any(k.startswith("blocks.") for k in sd):
        return "authors"
    sample = ", ".join(list(sd)[:3])
    raise CheckpointError(f"not a Sequencer checkpoint: expected keys 'stages.*' or 'blocks.*', found {sample}, ...")


def authors_to_timm(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename the authors' keys to timm's layout (the downsampler moves to the next stage)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^blocks\.(\d+)\.\d+\.down\.", lambda m: f"stages.{int(m.group(1)) + 1}.downsample.down.", k)
        k = re.sub(r"^blocks\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", k)
        k = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)
        out[k] = v
    return out


def timm_to_authors(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename timm-layout keys to the authors' (the downsampler closes the previous stage)."""
    depths: dict[int, int] = {}
    for k in sd:
        m = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.", k)
        if m:
            s, b = int(m.group(1)), int(m.group(2))
            depths[s] = max(depths.get(s, 0), b + 1)
    out = {}
    for k, v in sd.items():
        m = re.match(r"^stages\.(\d+)\.downsample\.down\.(.*)$", k)
        if m:
            prev = int(m.group(1)) - 1
            k = f"blocks.{prev}.{depths.get(prev, 0)}.down.{m.group(2)}"
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"blocks.\1.\2.", k)
        k = re.sub(r"^head\.fc\.", "head.", k)
        out[k] = v
    return out


def convert_state_dict(sd: Mapping[str, Tensor], to: str) -> dict[str, Tensor]:
    """Convert a state dict of either layout to ``to`` ("seqvision", "timm" or "authors")."""
    if to not in FORMATS:
        raise CheckpointError(f"unknown format {to!r}; choose one of {', '.join(FORMATS)}")
    native = authors_to_timm(sd) if detect_format(sd) == "authors" else dict(sd)
    return timm_to_authors(native) if to == "authors" else native


# -- loading into a model ----------------------------------------------------------------------------
def load_weights(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Tensor],
    strict: bool = True,
    variant_hint: Callable[[Mapping[str, Tensor]], str | None] | None = None,
) -> dict:
    """Load a checkpoint of any supported format into a seqvision model.

    A classifier of another size is skipped and the model keeps its fresh head (with a warning), as
    timm does for ``num_classes`` != the checkpoint's. A stem made for another number of input channels is
    adapted to the model's ``in_chans`` (``adapt_input_channels``, one log line), as timm does too. Anything else
    that does not fit raises a ``CheckpointError`` naming the missing / unexpected keys and shape mismatches.
    ``variant_hint(sd)`` names the variant a state dict that does not fit would fit, for that error message
    (``seqvision.models.guess_variant``). Returns ``{"format", "head_reset", "missing", "unexpected"}``.
    """
    if isinstance(source, Mapping):
        sd, name = unwrap_state_dict(source), "state dict"
    else:
        sd, name = read_stored(source).state_dict, str(source)
    fmt = detect_format(sd)
    sd = authors_to_timm(sd) if fmt == "authors" else sd
    own = model.state_dict()
    sd = _adapt_first_conv(model, sd, own, name)

    head_reset = False
    file_head = sd.get("head.fc.weight")
    model_head = own.get("head.fc.weight")
    if file_head is not None and (model_head is None or model_head.shape != file_head.shape):
        sd = {k: v for k, v in sd.items() if k not in HEAD_KEYS}
        head_reset = True
        classes = model_head.shape[0] if model_head is not None else 0
        warnings.warn(
            f"{name} has a {file_head.shape[0]}-class head and the model {classes} classes: "
            "the classifier was re-initialised, all other weights loaded",
            stacklevel=2,
        )

    missing = [k for k in own if k not in sd and not (head_reset and k in HEAD_KEYS)]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if strict and (missing or unexpected or shapes):
        guess = variant_hint(sd) if variant_hint is not None else None
        raise CheckpointError(_mismatch_message(model, name, sd, own, missing, unexpected, shapes, guess))
    model.load_state_dict({k: v for k, v in sd.items() if k in own and k not in shapes}, strict=False)
    return {"format": fmt, "head_reset": head_reset, "missing": missing, "unexpected": unexpected}


def adapt_input_channels(weight: Tensor, in_chans: int) -> Tensor:
    """A first conv's weight (out x C x kh x kw) made for ``in_chans`` input channels, as timm adapts pretrained
    stems: for one channel the sum over the file's C (a grey image then meets the filters an RGB image with three
    equal channels would); for more, the file's channels repeated cyclically and scaled by C / in_chans, which keeps
    the scale of the conv's output. Computed in float32, returned in the weight's dtype."""
    file_chans = weight.shape[1]
    if in_chans == file_chans:
        return weight
    w = weight.float()
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        w = w.repeat(1, math.ceil(in_chans / file_chans), 1, 1)[:, :in_chans] * (file_chans / in_chans)
    return w.to(weight.dtype)


def _adapt_first_conv(model: nn.Module, sd: dict[str, Tensor], own: Mapping[str, Tensor], name: str) -> dict:
    """``sd`` with its first conv adapted to the model's input channels where only those differ (one log line)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    key = f"{cfg.get('first_conv') or 'stem.proj'}.weight"
    theirs, ours = sd.get(key), own.get(key)
    if theirs is None or ours is None or theirs.ndim != 4 or theirs.shape == ours.shape:
        return sd
    if theirs.shape[0] != ours.shape[0] or theirs.shape[2:] != ours.shape[2:]:
        return sd  # another architecture: reported as a shape mismatch
    file_chans, in_chans = theirs.shape[1], ours.shape[1]
    how = "summed" if in_chans == 1 else f"repeated and scaled by {file_chans}/{in_chans}"
    _log.warning(
        "%s: adapted %s from the file's %d input channels to the model's %d (%s)", name, key, file_chans, in_chans, how
    )
    return {**sd, key: adapt_input_channels(theirs, in_chans)}


def _mismatch_message(model, name, sd, own, missing, unexpected, shapes, guess: str | None) -> str:
    variant = getattr(model, "variant", type(model).__name__)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if shapes:
        k = shapes[0]
        file_shape, model_shape = tuple(sd[k].shape), tuple(own[k].shape)
        parts.append(f"{len(shapes)} shape mismatches (e.g. {k}: file {file_shape}, model {model_shape})")
    hint = f"; it looks like a {guess} checkpoint" if guess and guess != variant else ""
    return f"{name} does not fit {variant}: " + ", ".join(parts) + hint


def load_from_url(model: nn.Module, url: str, cache_dir: str | os.PathLike | None = None) -> dict:
    """Load the weights at ``url`` (downloaded once into torch's hub cache, or into ``cache_dir``) into ``model``."""
    try:
        obj = torch.hub.load_state_dict_from_url(
            url, model_dir=None if cache_dir is None else str(cache_dir), map_location="cpu", weights_only=True,
            check_hash=False,
        )  # fmt: skip
    except (urllib.error.URLError, OSError) as e:
        folder = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
        cache = folder / Path(url).name
        raise CheckpointError(
            f"could not download {url} ({_first_line(e)}); download it yourself to {cache} or pass checkpoint_path="
        ) from None
    return load_weights(model, unwrap_state_dict(obj, url))


# -- saving ------------------------------------------------------------------------------------------
def save_weights(
    state: nn.Module | Mapping[str, Tensor],
    path: str | os.PathLike,
    fmt: str = "seqvision",
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Write weights in ``fmt``: safetensors when ``path`` ends in .safetensors, else a torch .pth.

    The seqvision format is always safetensors; it records ``info`` (``INFO_KEYS``: the variant name,
    extra model arguments, class names, preprocessing) in the metadata so the file stands on its own. Saved from
    a model, the variant and the arguments it was built with are recorded unless ``info`` gives them.
    """
    sd = state.state_dict() if isinstance(state, nn.Module) else dict(state)
    sd = {k: v.detach().cpu().contiguous() for k, v in convert_state_dict(sd, fmt).items()}
    info = dict(info or {})
    if isinstance(state, nn.Module) and hasattr(state, "variant"):
        info.setdefault("model_name", state.variant)
        if getattr(state, "model_kwargs", None):
            info.setdefault("model_kwargs", dict(state.model_kwargs))
    meta = {"format": "pt", "layout": "authors" if fmt == "authors" else "timm"}
    if fmt == "seqvision":
        for k, v in info.items():
            if k in INFO_KEYS:
                meta[k] = json.dumps(v) if k in JSON_KEYS else str(v)
    path = Path(path)
    if fmt == "seqvision" and path.suffix != ".safetensors":
        raise CheckpointError(f"the seqvision format is safetensors: name the output *.safetensors, not {path.name}")
    if path.suffix == ".safetensors":
        return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))
    return atomic_write(path, lambda tmp: torch.save(sd, tmp))
