"""``seqvision train``: train or fine-tune a Sequencer with the paper's recipes, on one process or many.

The pipeline is timm's: ``create_transform`` (RandomResizedCrop, RandAugment, random erasing), ``Mixup``,
soft-target / label-smoothing cross-entropy, ``create_optimizer_v2`` (AdamW, no weight decay on biases and
norms, optional layer-wise decay), ``create_scheduler_v2`` (cosine, warm-up, cool-down) and ``ModelEmaV3``.
This module adds what a long run needs around it: recipes as YAML with command-line overrides, linear
learning-rate scaling, exact resumption (checkpoints hold the optimiser, scheduler, scaler, EMA, RNG states
and the position inside the epoch), a stop on a non-finite loss, DDP / FSDP under torchrun, and the
records of a run (metrics CSV, TensorBoard, a PNG of the curves and summary.json).

Exactness of ``--resume``: each sample's augmentation is seeded from (seed, epoch, index)
(``seqvision.data.SeededDataset``), the order of an epoch from (seed, epoch), and the process-wide RNGs
(dropout, drop-path, mixup) are saved in every checkpoint, so a run killed at any point and resumed from
its last checkpoint ends with the same numbers as one that was never interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import difflib
import io
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import ops
from .errors import UserError

CHECKPOINT_VERSION = 1
# BiLSTM2D engines a run may ask for ("traceable" is the export-time path, not a training choice).
TRAIN_ENGINES = tuple(e for e in ops.ENGINES if e != "traceable")
CONFIG_DIRS = (Path(__file__).resolve().parent.parent / "configs", Path("configs"))


class ConfigError(UserError, ValueError):
    """A recipe or override that cannot be used."""


class DivergedError(UserError, FloatingPointError):
    """The loss became NaN or infinite; the run stopped and its last good checkpoint was left as it was."""


# -- configuration -------------------------------------------------------------------------------------------
# Every key a recipe may set, with timm's train.py defaults where the paper leaves a value unspecified.
BASE: dict[str, Any] = {
    # model
    "model": "sequencer2d_s",
    "model_kwargs": {},  # any other create_model() / Sequencer argument, e.g. layers, embed_dims
    "pretrained": False,  # start from the published ImageNet-1K weights
    "finetune": None,  # or from this checkpoint (any format seqvision.weights reads)
    "num_classes": None,  # default: the data set's
    "drop_path": 0.0,
    "drop": 0.0,
    # data
    "dataset": "digits",  # digits | mnist5k | folder | cifar10 | cifar100 | flowers102 | stanford_cars
    "data_dir": None,
    "img_size": 224,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "crop_pct": 0.875,  # evaluation resize = img_size / crop_pct, then centre crop
    "interpolation": "bicubic",  # evaluation
    "train_interpolation": "random",  # random bilinear / bicubic, as in the paper
    "scale": [0.08, 1.0],
    "ratio": [0.75, 1.3333333333333333],
    "hflip": 0.5,
    "color_jitter": 0.4,
    "aa": None,  # e.g. rand-m9-mstd0.5-inc1
    "reprob": 0.0,
    "remode": "pixel",
    "recount": 1,
    "mixup": 0.0,
    "cutmix": 0.0,
    "mixup_prob": 1.0,
    "mixup_switch_prob": 0.5,
    "mixup_mode": "batch",
    "smoothing": 0.1,
    "workers": 4,
    # optimisation
    "epochs": 300,  # cosine length; the run lasts epochs + cooldown_epochs (timm's convention)
    "cooldown_epochs": 0,
    "warmup_epochs": 5,
    "warmup_lr": 1e-5,
    "min_lr": 0.0,
    "sched": "cosine",
    "opt": "adamw",
    "lr": 1e-3,
    "lr_base_batch": 1024,  # the global batch `lr` is meant for
    "lr_scaling": "linear",  # linear | none
    "weight_decay": 0.05,
    "layer_decay": None,
    "momentum": 0.9,
    "batch_size": 128,  # per process
    "accum_steps": 1,
    "clip_grad": None,
    "clip_mode": "norm",
    "model_ema": False,
    "model_ema_decay": 0.9998,
    # engine
    "device": "auto",
    "amp": False,
    "amp_dtype": "auto",  # auto (float16 on CUDA, bfloat16 on CPU) | bfloat16 | float16 (CUDA, with a GradScaler)
    "grad_checkpointing": False,
    "compile": False,
    "engine": "auto",  # BiLSTM2D engine (seqvision.ops): auto | fused | triton | reference
    "channels_last": "auto",  # auto = on CUDA only (where the stem convolution gains from it)
    "fsdp": False,
    "seed": 0,
    # records
    "output": None,  # default: runs/<recipe>-<date-time>
    "eval_batch_size": None,  # default: 2 x batch_size
    "save_every_steps": 0,  # mid-epoch checkpoints every N optimiser updates (0: off)
    "save_every_minutes": 10.0,  # ... or when this much time has passed since the last one (0: off)
    "progress": "auto",  # auto (bars on a terminal, a line per epoch otherwise) | true | false
    "tensorboard": True,
    "log_every_steps": 50,  # a log line every N updates when not showing bars (0: off)
}

# The built-in default (configs/digits.yaml holds the same): a 0.6M-parameter Sequencer2D on scikit-learn's
# 8x8 digits, upsampled to 32 px, that trains on two CPU cores in about a minute.
DIGITS: dict[str, Any] = {
    "model": "sequencer2d_s",
    "model_kwargs": {
        "layers": [1, 1, 1, 1],
        "patch_sizes": [4, 2, 1, 1],
        "embed_dims": [64, 128, 128, 128],
        "hidden_sizes": [16, 32, 32, 32],
    },
    "dataset": "digits",
    "img_size": 32,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "crop_pct": 1.0,
    "interpolation": "bicubic",
    "train_interpolation": "bicubic",
    "scale": [0.6, 1.0],
    "ratio": [0.8, 1.25],
    "hflip": 0.0,  # a mirrored 2 is not a 2
    "color_jitter": None,
    "workers": 0,  # 1,437 images in memory: worker processes cost more than they save
    "epochs": 20,
    "warmup_epochs": 1,
    "min_lr": 1e-5,
    "lr": 2e-3,
    "lr_base_batch": 64,
    "batch_size": 64,
    "weight_decay": 0.05,
    "save_every_minutes": 0.0,
    "tensorboard": True,
}

_NULLABLE = ("color_jitter",)  # numbers that may also be null (off)
# Ranges of the numeric keys (null, where a key allows it, is always fine). A value outside them would not fail
# at once but deep inside timm or torch (a negative worker count), or not at all (a negative clip norm, which
# trains on garbage gradients).
_UNIT = (lambda v: 0 <= v <= 1, "between 0 and 1")
_COUNTS = ("epochs", "batch_size", "accum_steps", "img_size", "recount", "eval_batch_size", "num_classes")
_RANGES: dict[str, tuple[Any, str]] = {
    **dict.fromkeys(("drop_path", "drop", "hflip", "reprob", "mixup_prob", "mixup_switch_prob"), _UNIT),
    "model_ema_decay": _UNIT,
    "smoothing": (lambda v: 0 <= v < 1, "at least 0 and below 1"),
    **dict.fromkeys(
        ("mixup", "cutmix", "color_jitter", "warmup_epochs", "cooldown_epochs", "warmup_lr", "min_lr",
         "weight_decay", "momentum", "workers", "save_every_steps", "save_every_minutes", "log_every_steps"),
        (lambda v: v >= 0, "0 or more"),
    ),
    **dict.fromkeys(("lr", "lr_base_batch", "crop_pct", "clip_grad", "layer_decay"), (lambda v: v > 0, "above 0")),
    **dict.fromkeys(_COUNTS, (lambda v: v >= 1, "at least 1")),
}  # fmt: skip
_BATCH_KEYS = ("batch_size", "accum_steps", "dataset", "data_dir", "seed")
_SCHEDULE_KEYS = (
    "sched",
    "epochs",
    "cooldown_epochs",
    "warmup_epochs",
    "warmup_lr",
    "min_lr",
    "lr",
    "lr_base_batch",
    "lr_scaling",
)
_FLAG_KEYS = (
    "dataset",
    "data_dir",
    "model",
    "img_size",
    "epochs",
    "batch_size",
    "lr",
    "output",
    "finetune",
    "workers",
    "device",
    "seed",
    "amp",
    "amp_dtype",
    "compile",
    "engine",
    "grad_checkpointing",
    "accum_steps",
    "clip_grad",
    "model_ema",
    "fsdp",
    "pretrained",
)


def recipe_paths() -> dict[str, Path]:
    """The recipe YAML files found in ``configs/`` (next to the package, then in the working directory)."""
    found: dict[str, Path] = {}
    for d in CONFIG_DIRS:
        if d.is_dir():
            for p in sorted(d.glob("*.yaml")):
                found.setdefault(p.stem, p)
    return found


def load_recipe(name_or_path: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A recipe as a dict: a YAML file path, the name of a file in ``configs/``, or the built-in ``digits``.

    A recipe may name another under ``base:``; its keys are applied on top of that one's.
    """
    import yaml

    path = Path(name_or_path)
    if not path.is_file():
        path = recipe_paths().get(name_or_path)  # type: ignore[assignment]
    if path is None:
        if name_or_path == "digits":
            return copy.deepcopy(DIGITS)
        known = sorted(set(recipe_paths()) | {"digits"})
        raise ConfigError(f"no recipe {name_or_path!r}: give a YAML file or one of {', '.join(known)}")
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read recipe {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(recipe, dict):
        raise ConfigError(f"recipe {path} must be a mapping of keys to values")
    base = recipe.pop("base", None)
    if base:
        if base in _seen:
            raise ConfigError(f"recipe {path}: 'base: {base}' makes a cycle")
        parent = load_recipe(
            str(path.parent / f"{base}.yaml") if (path.parent / f"{base}.yaml").is_file() else base, (*_seen, base)
        )
        recipe = merge(parent, recipe)
    return recipe


def merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """``a`` updated with ``b``; nested mappings (model_kwargs) are merged key by key."""
    out = copy.deepcopy(dict(a))
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else copy.deepcopy(v)
    return out


_NEXT_PAIR = re.compile(r"\s*[A-Za-z_][\w.]*=")


def _split_pairs(text: str) -> list[str]:
    """``a=1,b.c=[1,2]`` -> ``["a=1", "b.c=[1,2]"]``: split at commas outside brackets that start a new KEY=."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0 and _NEXT_PAIR.match(text, i + 1):
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``--set key=value`` pairs (values in YAML syntax; ``a.b=v`` sets a nested key; ``a=1,b=2`` sets two)."""
    import yaml

    out: dict[str, Any] = {}
    for item in [pair for text in items or [] for pair in _split_pairs(text)]:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        if isinstance(value, str):
            try:  # YAML 1.1 reads 1e-3 (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def resolve_config(recipe: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """BASE <- recipe <- overrides, checked: unknown keys and wrong types are ConfigErrors."""
    for source, layer in (("recipe", recipe), ("override", overrides or {})):
        unknown = [k for k in layer if k not in BASE]
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(BASE), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown {source} key {unknown[0]!r}{hint}")
    cfg = merge(merge(BASE, recipe), overrides or {})
    for k, v in cfg.items():
        default = BASE[k]
        if isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
            cfg[k] = float(v)
        elif isinstance(default, float) and not isinstance(v, float) and not (v is None and k in _NULLABLE):
            raise ConfigError(f"{k} must be a number, got {v!r}")
        elif isinstance(default, bool) and not isinstance(v, bool) and k != "progress":
            raise ConfigError(f"{k} must be true or false, got {v!r}")
        elif isinstance(default, int) and not isinstance(default, bool) and not isinstance(v, int):
            raise ConfigError(f"{k} must be an integer, got {v!r}")
        elif isinstance(v, tuple):
            cfg[k] = list(v)
    for k, (ok, what) in _RANGES.items():
        v = cfg[k]
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int if k in _COUNTS else (int, float)):
            raise ConfigError(f"{k} must be {'an integer' if k in _COUNTS else 'a number'}, got {v!r}")
        if not ok(v):
            raise ConfigError(f"{k} must be {what}, got {v}")
    for k, top in (("scale", 1.0), ("ratio", float("inf"))):
        v = cfg[k]
        if not (
            isinstance(v, list)
            and len(v) == 2
            and all(isinstance(x, (int, float)) for x in v)
            and 0 < v[0] <= v[1] <= top
        ):
            bound = " <= 1" if top == 1.0 else ""
            raise ConfigError(f"{k} must be two numbers [low, high] with 0 < low <= high{bound}, got {v!r}")
    if cfg["amp_dtype"] not in ("auto", "bfloat16", "float16"):
        raise ConfigError(f"amp_dtype must be auto, bfloat16 or float16, got {cfg['amp_dtype']!r}")
    if cfg["engine"] not in TRAIN_ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(TRAIN_ENGINES)}, got {cfg['engine']!r}")
    if cfg["lr_scaling"] not in ("linear", "none"):
        raise ConfigError(f"lr_scaling must be linear or none, got {cfg['lr_scaling']!r}")
    if (cfg["mixup"] > 0 or cfg["cutmix"] > 0) and cfg["batch_size"] % 2:
        raise ConfigError(f"mixup / cutmix need an even batch size, got {cfg['batch_size']}")
    return cfg


def scaled_lr(cfg: Mapping[str, Any], world_size: int = 1) -> tuple[float, int]:
    """(learning rate for this run's global batch, that global batch): linear scaling from lr_base_batch."""
    global_batch = cfg["batch_size"] * cfg["accum_steps"] * world_size
    if cfg["lr_scaling"] == "none":
        return float(cfg["lr"]), global_batch
    return float(cfg["lr"]) * global_batch / cfg["lr_base_batch"], global_batch


# -- distributed ---------------------------------------------------------------------------------------------
class Dist:
    """This process's place in a torchrun job (or a single process)."""

    def __init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world_size > 1
        self.is_main = self.rank == 0

    def init(self, device: torch.device) -> None:
        if self.enabled and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over all processes."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj: Any) -> Any:
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


# -- RNG states (plain tensors and lists: checkpoints load with weights_only=True) ---------------------------
def get_rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, py_gauss = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(state), py_gauss],
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(*keys: int) -> None:
    """Seed torch, numpy and random from a tuple of integers (e.g. seed, epoch, rank)."""
    s = int(np.random.SeedSequence(list(keys)).generate_state(1)[0])
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


# -- timm models as peers -----------------------------------------------------------------------------------
def _timm_only(name: str) -> bool:
    """True for a timm model name that is not a seqvision variant (trained alike, for comparison)."""
    from .errors import UnknownModelError
    from .models import resolve_name

    try:
        resolve_name(name)
        return False
    except UnknownModelError:
        import timm

        return timm.is_model(name)


def _create_timm_model(name: str, img_size: int, **kwargs: Any) -> nn.Module:
    """``timm.create_model``; ``img_size`` goes only to models that take one (a ViT sizes its position
    embedding by it, a CNN has no such argument)."""
    import timm

    try:
        return timm.create_model(name, img_size=img_size, **kwargs)
    except TypeError:
        try:
            return timm.create_model(name, **kwargs)
        except TypeError as e:
            raise ConfigError(f"{name}: {e}") from None


# -- the run -------------------------------------------------------------------------------------------------
class Trainer:
    """One training run: build everything from a resolved config, then ``fit()``."""

    def __init__(
        self,
        cfg: dict[str, Any],
        recipe_name: str = "custom",
        resume: str | None = None,
        overwrite: bool = False,
        on_epoch: Callable[[dict[str, float]], None] | None = None,
    ):
        self.on_epoch = on_epoch  # called with each epoch's metrics on rank 0 (progress displays)
        self.dist = Dist()
        self.device = self._pick_device(cfg["device"])
        self.dist.init(self.device)
        self.resume_state: dict[str, Any] | None = None
        if resume:
            self.resume_state = self._read_resume(resume)
            saved = self.resume_state["config"]
            cfg = resolve_config({k: v for k, v in saved.items() if k in BASE}, cfg.pop("_overrides", {}))
            cfg["output"] = str(Path(self.resume_path).parent)
        cfg.pop("_overrides", None)
        self.cfg = cfg
        self.out = self._output_dir(recipe_name, resume is not None, overwrite)
        self.log_file = self.out / "log.txt" if self.dist.is_main else None
        self.t_start = time.time()

    # -- setup helpers ---------------------------------------------------------------------------------
    def _pick_device(self, name: str) -> torch.device:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if name == "auto":
            return torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError("device cuda was asked for but CUDA is not available here")
            if dev.index is None:
                dev = torch.device(f"cuda:{local}")
        return dev

    def _read_resume(self, resume: str) -> dict[str, Any]:
        from .weights import CheckpointError

        path = Path(resume)
        if path.is_dir():
            path = path / "last.pth"
        if not path.is_file():
            raise ConfigError(f"nothing to resume: {path} not found")
        self.resume_path = path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else e}") from None
        if not isinstance(state, dict) or state.get("kind") != "seqvision-train":
            raise CheckpointError(f"{path} is not a seqvision training checkpoint; use --finetune for weights")
        return state

    def _output_dir(self, recipe_name: str, resuming: bool, overwrite: bool) -> Path:
        out = self.cfg["output"]
        if out is None:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S") if self.dist.is_main else None
            out = str(Path("runs") / f"{recipe_name}-{self.dist.broadcast(stamp)}")
            self.cfg["output"] = out
        path = Path(out)
        if self.dist.is_main:
            if not resuming and (path / "last.pth").exists() and not overwrite:
                raise ConfigError(f"{path} already holds a run: --resume {path} continues it, --overwrite replaces it")
            path.mkdir(parents=True, exist_ok=True)
            if not resuming:
                for stale in ("last.pth", "best.pth", "metrics.csv", "summary.json", "log.txt"):
                    (path / stale).unlink(missing_ok=True)
        return path

    def log(self, msg: str) -> None:
        if not self.dist.is_main:
            return
        print(msg, flush=True)
        if self.log_file is not None:
            with open(self.log_file, "a") as f:
                f.write(msg + "\n")

    # -- building --------------------------------------------------------------------------------------
    def build(self) -> None:
        from timm.data import Mixup, create_transform
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        from .data import SeededDataset, build_datasets

        cfg, d = self.cfg, self.dist
        self.previous_engine = ops.get_engine()  # the run's choice is undone in close()
        ops.set_engine(cfg["engine"])
        if self.device.type == "cpu" and cfg["engine"] in ("auto", "fused"):
            from .ops import fused

            fused.available()  # a first build (~30 s) happens here, not inside epoch 1's timing
        seed_everything(cfg["seed"])  # model initialisation: the same on every rank
        size = cfg["img_size"]
        train_tf = create_transform(
            size,
            is_training=True,
            scale=tuple(cfg["scale"]),
            ratio=tuple(cfg["ratio"]),
            hflip=cfg["hflip"],
            color_jitter=cfg["color_jitter"],
            auto_augment=cfg["aa"],
            interpolation=cfg["train_interpolation"],
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            re_prob=cfg["reprob"],
            re_mode=cfg["remode"],
            re_count=cfg["recount"],
        )
        self.data_config = {
            "input_size": (3, size, size),
            "interpolation": cfg["interpolation"],
            "mean": tuple(cfg["mean"]),
            "std": tuple(cfg["std"]),
            "crop_pct": cfg["crop_pct"],
            "crop_mode": "center",
        }
        val_tf = create_transform(**self.data_config, is_training=False)
        splits = build_datasets(cfg["dataset"], cfg["data_dir"], train_tf, val_tf, size)
        self.class_names = splits.class_names
        self.train_set = SeededDataset(splits.train, cfg["seed"])
        self.val_set = splits.val
        num_classes = cfg["num_classes"] or len(self.class_names)
        if num_classes < len(self.class_names):
            raise ConfigError(f"num_classes {num_classes} < the {len(self.class_names)} classes of the data")
        self.num_classes = num_classes

        self.model = self._build_model(num_classes)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.lr, self.global_batch = scaled_lr(cfg, d.world_size)
        # On the bare module (DDP's "module." prefix would defeat layer-wise decay); FSDP: the wrapped one.
        self.optimizer = create_optimizer_v2(
            self.core,
            opt=cfg["opt"],
            lr=self.lr,
            weight_decay=cfg["weight_decay"],
            momentum=cfg["momentum"],
            layer_decay=cfg["layer_decay"],
            # torch's fused Adam(W) updates all parameters in one kernel: 32 vs 139 ms per step for
            # Sequencer2D-S on 2 CPU cores against the default per-tensor loop; the same update rule.
            **({"fused": True} if cfg["opt"].lower() in ("adam", "adamw") else {}),
        )

        self.batches_per_epoch = (len(self.train_set) // d.world_size) // cfg["batch_size"]
        if self.batches_per_epoch < 1:
            raise ConfigError(
                f"the training set ({len(self.train_set)} images over {d.world_size} process(es)) is smaller "
                f"than one batch of {cfg['batch_size']}: lower --batch-size"
            )
        self.updates_per_epoch = math.ceil(self.batches_per_epoch / cfg["accum_steps"])
        self.scheduler, self.total_epochs = create_scheduler_v2(
            self.optimizer,
            sched=cfg["sched"],
            num_epochs=cfg["epochs"],
            cooldown_epochs=cfg["cooldown_epochs"],
            warmup_epochs=cfg["warmup_epochs"],
            warmup_lr=cfg["warmup_lr"],
            min_lr=cfg["min_lr"],
            step_on_epochs=False,
            updates_per_epoch=self.updates_per_epoch,
        )

        # Mixed precision: bf16 autocast anywhere; fp16 on CUDA only, with a loss scaler.
        dtype = cfg["amp_dtype"]
        if dtype == "auto":
            dtype = "float16" if self.device.type == "cuda" else "bfloat16"
        self.amp_dtype = getattr(torch, dtype)
        if cfg["amp"] and self.amp_dtype == torch.float16 and self.device.type != "cuda":
            raise ConfigError("amp_dtype float16 needs CUDA; use bfloat16 on CPU")
        if cfg["amp"] and self.device.type == "cpu" and not ops.cpu_has_bf16():
            self.log(
                "warning: --amp on a CPU where oneDNN has no bf16 path (it needs AVX-512 or AMX): bf16 is far slower "
                "than float32 here; drop --amp"
            )
        self.scaler = None
        if cfg["amp"] and self.amp_dtype == torch.float16:
            from timm.utils import NativeScaler

            self.scaler = NativeScaler(device=self.device.type)

        self.ema = None
        if cfg["model_ema"] and cfg["fsdp"] and d.enabled:
            raise ConfigError("model_ema is not supported with fsdp (the EMA copy would not be sharded)")
        if cfg["model_ema"]:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.core, decay=cfg["model_ema_decay"])

        self.mixup = None
        if cfg["mixup"] > 0 or cfg["cutmix"] > 0:
            self.mixup = Mixup(
                mixup_alpha=cfg["mixup"],
                cutmix_alpha=cfg["cutmix"],
                prob=cfg["mixup_prob"],
                switch_prob=cfg["mixup_switch_prob"],
                mode=cfg["mixup_mode"],
                label_smoothing=cfg["smoothing"],
                num_classes=num_classes,
            )
            self.train_loss = SoftTargetCrossEntropy()
        elif cfg["smoothing"] > 0:
            self.train_loss = LabelSmoothingCrossEntropy(cfg["smoothing"])
        else:
            self.train_loss = nn.CrossEntropyLoss()
        self.val_loss = nn.CrossEntropyLoss(reduction="sum")

    def _build_model(self, num_classes: int) -> nn.Module:
        from .models import create_model
        from .weights import load_weights

        cfg, d = self.cfg, self.dist
        kwargs = dict(cfg["model_kwargs"])
        if cfg["fsdp"] and d.enabled and cfg["layer_decay"]:
            raise ConfigError("layer_decay is not supported with fsdp (parameter names change under FSDP)")
        timm_peer = _timm_only(cfg["model"])
        if timm_peer and cfg["finetune"]:
            raise ConfigError(f"finetune loads seqvision variants only; {cfg['model']} is a timm model")
        model = (_create_timm_model if timm_peer else create_model)(
            cfg["model"],
            pretrained=cfg["pretrained"] and not cfg["finetune"] and self.resume_state is None,
            num_classes=num_classes,
            img_size=cfg["img_size"],
            drop_path_rate=cfg["drop_path"],
            drop_rate=cfg["drop"],
            **kwargs,
        )
        if cfg["finetune"] and self.resume_state is None:
            info = load_weights(model, cfg["finetune"])
            head = "a new classifier head" if info["head_reset"] else "its classifier head"
            self.log(f"fine-tuning from {cfg['finetune']} ({info['format']} layout, {head})")
        if self.resume_state is not None:
            model.load_state_dict(self.resume_state["model"])
        if cfg["grad_checkpointing"]:
            model.set_grad_checkpointing(True)
        self.channels_last = cfg["channels_last"] is True or (
            cfg["channels_last"] == "auto" and self.device.type == "cuda"
        )
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.core = model  # the bare module: what checkpoints and EMA hold
        if d.enabled and cfg["fsdp"]:
            # FSDP2: every block's parameters sharded across ranks (gathered for its forward/backward), then the
            # rest (stem, downsamplers, head) as one unit. Works on CPU with gloo as well as on GPUs.
            from torch.distributed.fsdp import fully_shard

            for block in (m for m in model.modules() if type(m).__name__ == "SequencerBlock"):
                fully_shard(block)
            fully_shard(model)
        elif d.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(model, device_ids=[self.device] if self.device.type == "cuda" else None)
        if cfg["compile"]:
            model = torch.compile(model, dynamic=False)  # static shapes: a graph per batch shape
        return model

    # -- checkpoints -----------------------------------------------------------------------------------
    def _sharded(self) -> bool:
        return bool(self.cfg["fsdp"] and self.dist.enabled)

    def _model_state(self) -> dict[str, Tensor]:
        if self._sharded():  # collective: the full (unsharded) weights, gathered to the CPU
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.core, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu() for k, v in self.core.state_dict().items()}

    def _optim_state(self) -> dict[str, Any]:
        if self._sharded():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_optimizer_state_dict(self.core, self.optimizer, options=options)
        return self.optimizer.state_dict()

    def checkpoint(self, epoch: int, step: int, extra: dict[str, Any]) -> dict[str, Any] | None:
        """The full training state (None on ranks other than 0). ``epoch``/``step``: where to continue."""
        model_sd, optim_sd = self._model_state(), self._optim_state()  # collective under FSDP
        if not self.dist.is_main:
            return None
        state = {
            "kind": "seqvision-train",
            "version": CHECKPOINT_VERSION,
            "model": model_sd,
            "optimizer": optim_sd,
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            "step": step,
            "world_size": self.dist.world_size,
            "rng": get_rng_state(),
            "config": self.cfg,
            "model_name": self.cfg["model"],
            "model_kwargs": dict(self.cfg["model_kwargs"]),
            "class_names": list(self.class_names),
            "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()},
            **extra,
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.ema is not None:
            state["model_ema"] = {k: v.detach().cpu() for k, v in self.ema.module.state_dict().items()}
        return state

    def save(self, state: dict[str, Any] | None, *names: str) -> None:
        from .weights import atomic_write

        if state is None:
            return
        buf = io.BytesIO()
        torch.save(state, buf)  # serialise once, write each name atomically (temp file + rename)
        data = buf.getvalue()
        for name in names:
            atomic_write(self.out / name, lambda tmp: Path(tmp).write_bytes(data))

    def _restore(self, state: dict[str, Any]) -> None:
        if self._sharded():  # every rank read the file; each keeps its own shard of the full state
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(self.core, self.optimizer, state["optimizer"], options=options)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and "model_ema" in state:
            self.ema.module.load_state_dict(state["model_ema"])

    # -- one epoch -------------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.cfg["amp"]:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _loader(self, epoch: int, start_batch: int) -> Iterator:
        from torch.utils.data import DataLoader

        from .data import ShardedEpochSampler, collate_with_problems

        cfg, d = self.cfg, self.dist
        sampler = ShardedEpochSampler(len(self.train_set), True, cfg["seed"], d.rank, d.world_size)
        sampler.set_epoch(epoch, start=start_batch * cfg["batch_size"])
        self.train_set.set_epoch(epoch)
        # Its own generator: creating the iterator must not draw from the global RNG that resumption restores.
        gen = torch.Generator().manual_seed(cfg["seed"] * 100003 + epoch)
        loader = DataLoader(
            self.train_set,
            batch_size=cfg["batch_size"],
            sampler=sampler,
            drop_last=True,
            generator=gen,
            num_workers=cfg["workers"],
            collate_fn=collate_with_problems,
            pin_memory=self.device.type == "cuda",
        )
        return iter(loader)

    def _check_problems(self, problems: list[str]) -> None:
        from .errors import DataError

        if problems:
            more = f" (and {len(problems) - 1} more in this batch)" if len(problems) > 1 else ""
            raise DataError(problems[0] + more)

    def train_epoch(self, epoch: int, start_batch: int, running: dict[str, float]) -> dict[str, float]:
        cfg, d = self.cfg, self.dist
        accum = cfg["accum_steps"]
        self.model.train()
        n_batches = self.batches_per_epoch
        bar = self._bar(epoch, start_batch, n_batches)
        t0, seen = time.time(), 0
        params = [p for p in self.model.parameters() if p.requires_grad]
        for b, (x, y, problems) in enumerate(self._loader(epoch, start_batch), start=start_batch):
            if b >= n_batches:  # DistributedSampler may pad; every rank runs exactly n_batches
                break
            self._check_problems(problems)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.mixup is not None:
                x, y = self.mixup(x, y)
            group_start = (b // accum) * accum
            group = min(accum, n_batches - group_start)  # the last group of an epoch may be shorter
            update = b + 1 == group_start + group
            sync = contextlib.nullcontext()
            if not update and d.enabled and hasattr(self.model, "no_sync"):
                sync = self.model.no_sync()  # accumulate locally; all-reduce once per update
            elif d.enabled and hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2: the same
                self.model.set_requires_gradient_sync(update)
            with sync:
                with self._autocast():
                    loss = self.train_loss(self.model(x), y)
                loss_value = loss.detach().float()
                self._check_finite(loss_value, epoch, b)
                if self.scaler is not None:
                    self.scaler(
                        loss / group,
                        self.optimizer,
                        clip_grad=cfg["clip_grad"],
                        clip_mode=cfg["clip_mode"],
                        parameters=params,
                        need_update=update,
                    )
                else:
                    (loss / group).backward()
                    if update:
                        self._clip(params)
                        self.optimizer.step()
            running["loss_sum"] += loss_value.item() * x.shape[0]
            running["samples"] += x.shape[0]
            seen += x.shape[0]
            if update:
                self.optimizer.zero_grad(set_to_none=True)
                running["updates"] += 1
                self.num_updates += 1
                if self.ema is not None:
                    self.ema.update(self.core, step=self.num_updates)
                self.scheduler.step_update(num_updates=self.num_updates)
            lr = self.optimizer.param_groups[0]["lr"]
            rate = seen * d.world_size / max(time.time() - t0, 1e-9)
            if bar is not None:
                bar.set_postfix_str(
                    f"loss {running['loss_sum'] / running['samples']:.4f}  lr {lr:.3g}  {rate:.0f} img/s"
                )
                bar.update(1)
            elif update and cfg["log_every_steps"] and running["updates"] % cfg["log_every_steps"] == 0:
                self.log(
                    f"  epoch {epoch + 1} step {b + 1}/{n_batches}  loss {loss_value.item():.4f}  "
                    f"lr {lr:.3g}  {rate:.0f} img/s"
                )
            if update and b + 1 < n_batches and self._step_checkpoint_due():
                self.save(self.checkpoint(epoch, b + 1, self._extra(running)), "last.pth")
                self.last_save = time.time()
        if bar is not None:
            bar.close()
        loss_sum, samples = d.sum([running["loss_sum"], running["samples"]], self.device)
        return {
            "train_loss": loss_sum / max(samples, 1),
            "lr": self.optimizer.param_groups[0]["lr"],
            "img_per_s": seen * d.world_size / max(time.time() - t0, 1e-9),
        }

    def _clip(self, params: list[Tensor]) -> None:
        if self.cfg["clip_grad"] is None:
            return
        from timm.utils import dispatch_clip_grad

        dispatch_clip_grad(params, self.cfg["clip_grad"], mode=self.cfg["clip_mode"])

    def _check_finite(self, loss: Tensor, epoch: int, batch: int) -> None:
        bad = (~torch.isfinite(loss)).float()
        if self.dist.enabled:  # every rank must stop together, or the others wait forever
            dist.all_reduce(bad)
        if bad.item() > 0:
            last = self.out / "last.pth"
            kept = f"the last good checkpoint, {last}, is unchanged" if last.exists() else "no checkpoint was written"
            raise DivergedError(
                f"the loss became {loss.item()} at epoch {epoch + 1}, batch {batch + 1}: training stopped and {kept}. "
                "Lower the learning rate (--lr), add gradient clipping (--clip-grad 1.0) or turn off float16 AMP."
            )

    def _step_checkpoint_due(self) -> bool:
        cfg = self.cfg
        by_steps = cfg["save_every_steps"] and self.num_updates % cfg["save_every_steps"] == 0
        by_time = cfg["save_every_minutes"] and time.time() - self.last_save >= 60 * cfg["save_every_minutes"]
        due = bool(by_steps or by_time)
        if self.dist.enabled:  # the time test could differ between ranks; rank 0 decides
            due = bool(self.dist.broadcast(due))
        return due

    def _bar(self, epoch: int, start: int, total: int) -> Any:
        show = self.cfg["progress"]
        if show == "auto":
            show = sys.stderr.isatty()
        if not show or not self.dist.is_main:
            return None
        from tqdm import tqdm

        return tqdm(
            total=total,
            initial=start,
            desc=f"epoch {epoch + 1}/{self.total_epochs}",
            unit="batch",
            dynamic_ncols=True,
            leave=False,
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        from torch.utils.data import DataLoader, Subset

        from .data import collate_with_problems, shard_indices

        d = self.dist
        model.eval()
        # Every rank runs the same number of batches (FSDP's forward is collective): shards are padded with
        # repeats of their first index, and the padding is left out of the metrics.
        mine = shard_indices(len(self.val_set), d.rank, d.world_size)
        n_real = len(mine)
        longest = math.ceil(len(self.val_set) / d.world_size)
        subset = Subset(self.val_set, mine + mine[:1] * (longest - n_real))
        bs = self.cfg["eval_batch_size"] or 2 * self.cfg["batch_size"]
        loader = DataLoader(
            subset, batch_size=bs, shuffle=False, num_workers=self.cfg["workers"], collate_fn=collate_with_problems
        )
        loss = top1 = top5 = n = 0.0
        seen = 0
        for x, y, problems in loader:
            self._check_problems(problems)
            keep = max(0, min(y.numel(), n_real - seen))
            seen += y.numel()
            x, y = x.to(self.device), y.to(self.device)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                logits = model(x)
            logits, y = logits.float()[:keep], y[:keep]
            loss += self.val_loss(logits, y).item()
            k = min(5, logits.shape[1])
            hits = logits.topk(k, dim=1).indices == y[:, None]
            top1 += hits[:, 0].sum().item()
            top5 += hits.any(dim=1).sum().item()
            n += y.numel()
        loss, top1, top5, n = d.sum([loss, top1, top5, n], self.device)
        return {"val_loss": loss / max(n, 1), "top1": 100 * top1 / max(n, 1), "top5": 100 * top5 / max(n, 1)}

    def _extra(self, running: dict[str, float]) -> dict[str, Any]:
        return {
            "running": dict(running),
            "num_updates": self.num_updates,
            "history": self.history,
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "train_seconds": self.train_seconds + time.time() - self.t_segment,
        }

    # -- the whole run ---------------------------------------------------------------------------------
    def _engine_description(self) -> str:
        """The engine choice as the log shows it: what ``auto`` resolves to on this device."""
        engine = ops.get_engine()
        if engine != "auto":
            return engine
        if self.device.type == "cuda":
            return "auto (Triton where it covers the layer, cuDNN elsewhere)"
        from .ops import fused

        if not fused.available():
            return f"auto (reference: the fused kernel is unavailable, {fused.load_error()})"
        return f"auto (fused C++ kernel, {fused.parallel_threads()} threads)"

    def fit(self) -> dict[str, Any]:
        cfg, d = self.cfg, self.dist
        self.build()
        self.history: list[dict[str, float]] = []
        self.best_top1, self.best_epoch, self.num_updates = -1.0, -1, 0
        self.train_seconds, start_epoch, start_batch = 0.0, 0, 0
        running = {"loss_sum": 0.0, "samples": 0.0, "updates": 0.0}
        rng_state = None
        if self.resume_state is not None:
            s = self.resume_state
            self._restore(s)
            start_epoch, start_batch = s["epoch"], s["step"]
            self.history, self.best_top1, self.best_epoch = list(s["history"]), s["best_top1"], s["best_epoch"]
            self.num_updates, self.train_seconds = s["num_updates"], s["train_seconds"]
            running = dict(s["running"]) if start_batch else running
            rng_state = s["rng"] if start_batch else None
            same_layout = s["world_size"] == d.world_size and all(s["config"][k] == cfg[k] for k in _BATCH_KEYS)
            if start_batch and not same_layout:  # the saved position means nothing with other batches
                self.log("the batch size or process count changed: the interrupted epoch starts again")
                start_batch, rng_state = 0, None
                running = {"loss_sum": 0.0, "samples": 0.0, "updates": 0.0}
                self.num_updates = start_epoch * self.updates_per_epoch
            if same_layout and all(s["config"][k] == cfg[k] for k in _SCHEDULE_KEYS):
                self.scheduler.load_state_dict(s["scheduler"])
            else:
                self.log("the learning-rate schedule differs from the checkpoint's: following the new one")
            self.scheduler.step_update(num_updates=self.num_updates)
            self.log(f"resuming {self.resume_path}: epoch {start_epoch + 1}, batch {start_batch}")
        self.resume_state = None  # free the memory
        self._describe()
        self.writer = self._tensorboard(start_epoch)
        self.last_save = self.t_segment = time.time()
        for epoch in range(start_epoch, self.total_epochs):
            # The process-wide RNGs (dropout, drop-path, mixup) restart from (seed, epoch, rank) every epoch,
            # or from the checkpoint's state when resuming inside an epoch.
            seed_everything(cfg["seed"], epoch, d.rank)
            if rng_state is not None and epoch == start_epoch:
                set_rng_state(rng_state)
            t0 = time.time()
            train = self.train_epoch(epoch, start_batch if epoch == start_epoch else 0, running)
            metrics = {"epoch": epoch + 1, **train, **self.evaluate(self.core)}
            if self.ema is not None:
                ema = self.evaluate(self.ema.module)
                metrics.update(ema_top1=ema["top1"], ema_val_loss=ema["val_loss"])
            metrics["epoch_seconds"] = time.time() - t0
            self.history.append(metrics)
            is_best = metrics["top1"] > self.best_top1
            if is_best:
                self.best_top1, self.best_epoch = metrics["top1"], epoch + 1
            running = {"loss_sum": 0.0, "samples": 0.0, "updates": 0.0}
            state = self.checkpoint(epoch + 1, 0, self._extra(running))
            self.save(state, "last.pth", *(["best.pth"] if is_best else []))
            self.last_save = time.time()
            self._record_epoch(metrics, is_best)
        self.train_seconds += time.time() - self.t_segment
        return self._finish()

    def _describe(self) -> None:
        cfg, d = self.cfg, self.dist
        per = (
            f"{cfg['batch_size']} per process x {d.world_size} process(es) x {cfg['accum_steps']} accumulation step(s)"
        )
        if cfg["lr_scaling"] == "linear":
            lr_msg = (
                f"lr {cfg['lr']:g} is for a global batch of {cfg['lr_base_batch']}; this run's global batch is "
                f"{self.global_batch} ({per}) -> lr {self.lr:.4g} (linear scaling)"
            )
        else:
            lr_msg = f"lr {self.lr:g} for a global batch of {self.global_batch} ({per}), not scaled"
        amp = f"AMP {str(self.amp_dtype).removeprefix('torch.')}" if cfg["amp"] else "float32"
        wrap = "FSDP" if cfg["fsdp"] and d.enabled else "DDP" if d.enabled else "single process"
        self.log(f"seqvision train -> {self.out}")
        self.log(
            f"  model    {cfg['model']} {cfg['model_kwargs'] or ''} {self.n_params:,} parameters, "
            f"{cfg['img_size']} px, {self.num_classes} classes"
        )
        self.log(
            f"  data     {cfg['dataset']}: {len(self.train_set):,} training / {len(self.val_set):,} validation "
            f"images, {self.batches_per_epoch} batches per epoch per process"
        )
        self.log(f"  optim    {cfg['opt']}, {lr_msg}")
        self.log(
            f"  schedule {cfg['sched']}, {cfg['epochs']} epochs + {cfg['cooldown_epochs']} cool-down, "
            f"warm-up {cfg['warmup_epochs']} -> {self.total_epochs} epochs, {self.updates_per_epoch} updates each"
        )
        self.log(
            f"  engine   {self.device}, {amp}, {wrap}, BiLSTM2D engine {self._engine_description()}"
            + (", torch.compile" if cfg["compile"] else "")
            + (", gradient checkpointing" if cfg["grad_checkpointing"] else "")
        )

    def _tensorboard(self, start_epoch: int) -> Any:
        if not (self.cfg["tensorboard"] and self.dist.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            self.log("  (tensorboard is not installed: no TensorBoard logs)")
            return None
        # purge_step drops the events of epochs that a resumed run trains again
        return SummaryWriter(str(self.out / "tensorboard"), purge_step=start_epoch + 1 if start_epoch else None)

    def _record_epoch(self, m: dict[str, float], is_best: bool) -> None:
        if not self.dist.is_main:
            return
        ema = f"  ema top-1 {m['ema_top1']:.2f}" if "ema_top1" in m else ""
        self.log(
            f"epoch {m['epoch']}/{self.total_epochs}  train loss {m['train_loss']:.4f}  val loss "
            f"{m['val_loss']:.4f}  top-1 {m['top1']:.2f}  top-5 {m['top5']:.2f}{ema}  lr {m['lr']:.3g}  "
            f"{m['img_per_s']:.0f} img/s  {m['epoch_seconds']:.1f} s" + ("  *best" if is_best else "")
        )
        write_csv(self.out / "metrics.csv", self.history)
        if self.writer is not None:
            for k, v in m.items():
                if k != "epoch":
                    self.writer.add_scalar(k, v, m["epoch"])
            self.writer.flush()
        if self.on_epoch is not None:
            self.on_epoch(m)

    def _finish(self) -> dict[str, Any]:
        d = self.dist
        updates = d.gather(self.num_updates)
        if self.writer is not None:
            self.writer.close()
        if not d.is_main:
            return {}
        last = self.history[-1] if self.history else {}
        summary = {
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "final_top1": last.get("top1"),
            "final_top5": last.get("top5"),
            "final_train_loss": last.get("train_loss"),
            "epochs": self.total_epochs,
            "train_seconds": round(self.train_seconds, 2),
            "wall_seconds": round(time.time() - self.t_start, 2),
            "parameters": self.n_params,
            "model": self.cfg["model"],
            "dataset": self.cfg["dataset"],
            "global_batch": self.global_batch,
            "lr": self.lr,
            "world_size": d.world_size,
            "updates_per_rank": updates,
            "device": str(self.device),
            "output": str(self.out),
        }
        write_json(self.out / "summary.json", summary)
        try:
            plot_curves(self.history, self.out / "curves.png")
        except ImportError:
            self.log("(matplotlib is not installed: no curves.png)")
        self.log(
            f"done: best top-1 {self.best_top1:.2f} (epoch {self.best_epoch}), "
            f"{summary['train_seconds']:.0f} s training; {self.out}/best.pth, metrics.csv, curves.png"
        )
        return summary

    def close(self) -> None:
        if hasattr(self, "previous_engine"):
            ops.set_engine(self.previous_engine)
        self.dist.close()


# -- records -------------------------------------------------------------------------------------------------
def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """All epochs so far (rewritten each time, atomically, so a resumed run has no duplicate rows)."""
    from .weights import atomic_write

    fields = list(dict.fromkeys(k for r in rows for k in r))

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)


def write_json(path: Path, obj: Any) -> None:
    from .weights import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    """Loss, accuracy and learning rate per epoch, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .weights import atomic_write

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].plot(ep, [h["train_loss"] for h in history], label="train")
    ax[0].plot(ep, [h["val_loss"] for h in history], label="validation")
    ax[0].set(title="loss", xlabel="epoch")
    ax[1].plot(ep, [h["top1"] for h in history], label="top-1")
    ax[1].plot(ep, [h["top5"] for h in history], label="top-5")
    if history and "ema_top1" in history[0]:
        ax[1].plot(ep, [h["ema_top1"] for h in history], label="EMA top-1")
    ax[1].set(title="validation accuracy (%)", xlabel="epoch")
    ax[2].plot(ep, [h["lr"] for h in history])
    ax[2].set(title="learning rate (end of epoch)", xlabel="epoch")
    for a in ax[:2]:
        a.legend()
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


# -- command line --------------------------------------------------------------------------------------------
EPILOG = """\
recipes (--config NAME, from configs/; default: digits):
  digits                       small Sequencer2D on scikit-learn's 8x8 digits (CPU, about a minute)
  imagenet_s / _m / _l         ImageNet-1K from scratch (paper Sec. 4: 300 + 10 epochs, AdamW 2e-3 @ 2048)
  imagenet_l_392               fine-tune L at 392 px (30 epochs, lr 5e-5 @ 512)
  cifar10 / cifar100 / flowers102 / stanford_cars   transfer from ImageNet weights (200 + 10 epochs)

examples:
  seqvision train                                    # digits, the built-in default
  seqvision train --epochs 5 --set lr=1e-3 --output runs/quick
  seqvision train --resume runs/quick                # continue exactly where it stopped
  seqvision train -c imagenet_s --data-dir /data/imagenet --set batch_size=128,workers=8
  seqvision train -c cifar10 --data-dir /data/cifar --finetune sequencer2d_s.pth
  torchrun --nproc-per-node 8 -m seqvision train -c imagenet_s --data-dir /data/imagenet

Any recipe key can be set with --set KEY=VALUE (YAML values; repeat it, e.g. --set aa=null
--set model_kwargs.layers=[2,2,4,2]). The learning rate is for the recipe's global batch
(lr_base_batch) and is scaled linearly to the batch actually used (--set lr_scaling=none turns that off).
"""


def build_parser() -> argparse.ArgumentParser:
    from .data import DATASETS

    p = argparse.ArgumentParser(
        prog="seqvision train",
        description="Train or fine-tune a Sequencer with the paper's recipes (timm's pipeline); "
        "with no arguments, a small Sequencer2D on the built-in digits.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-c", "--config", default="digits", help="recipe name or YAML file (default: digits)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any recipe key (repeatable)")
    g = p.add_argument_group("common keys (shortcuts for --set)")
    g.add_argument("--data-dir", help="ImageFolder root (train/, val/) or a torchvision data set's folder")
    g.add_argument("--dataset", choices=DATASETS)
    g.add_argument("--model", help="variant name (seqvision models), or a timm model name to train as a peer")
    g.add_argument("--img-size", type=int)
    g.add_argument("--epochs", type=int, help="cosine schedule length (cool-down epochs come on top)")
    g.add_argument("--batch-size", type=int, help="per process")
    g.add_argument("--lr", type=float, help="for the recipe's global batch lr_base_batch")
    g.add_argument("--accum-steps", type=int, help="gradient accumulation")
    g.add_argument("--clip-grad", type=float)
    g.add_argument("--workers", type=int, help="DataLoader worker processes")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--seed", type=int)
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="mixed precision")
    g.add_argument("--amp-dtype", choices=("auto", "bfloat16", "float16"))
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    g.add_argument("--engine", choices=TRAIN_ENGINES, help="BiLSTM2D engine")
    g.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None, help="FSDP instead of DDP")
    g.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start from the published ImageNet-1K weights",
    )
    g.add_argument("--finetune", metavar="CKPT", help="start from these weights (any format; new head if needed)")
    r = p.add_argument_group("run")
    r.add_argument("-o", "--output", help="run directory (default: runs/<recipe>-<date-time>)")
    r.add_argument("--resume", metavar="RUN_OR_CKPT", help="continue a run (its directory or last.pth)")
    r.add_argument("--overwrite", action="store_true", help="replace a finished run in --output")
    r.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    return p


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The keys given on the command line (flags, then --set), as a config layer."""
    out: dict[str, Any] = {}
    for k in _FLAG_KEYS:
        v = getattr(args, k, None)
        if v is not None:
            out[k] = v
    out = merge(out, parse_set(getattr(args, "set", None)))
    if getattr(args, "data_dir", None) and not getattr(args, "dataset", None) and "dataset" not in out:
        out["_data_dir_only"] = True
    return out


def config_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """(resolved config, recipe name) for parsed ``seqvision train`` arguments."""
    recipe = load_recipe(args.config)
    overrides = overrides_from_args(args)
    if overrides.pop("_data_dir_only", False) and recipe.get("dataset", BASE["dataset"]) == "digits":
        overrides["dataset"] = "folder"  # --data-dir alone means an ImageFolder tree
    cfg = resolve_config(recipe, overrides)
    cfg["_overrides"] = overrides
    return cfg, Path(args.config).stem


def train(
    cfg: dict[str, Any], recipe_name: str = "custom", resume: str | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Run a training job from a resolved config; returns the summary (empty on ranks other than 0)."""
    trainer = Trainer(cfg, recipe_name, resume, overwrite)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def run(args: argparse.Namespace) -> int:
    cfg, name = config_from_args(args)
    if args.print_config:
        import yaml

        cfg.pop("_overrides", None)
        print(yaml.safe_dump(cfg, sort_keys=False), end="")
        return 0
    train(cfg, name, resume=args.resume, overwrite=args.overwrite)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m seqvision.train`` (torchrun can run this module directly); one-line errors like the CLI."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        if os.environ.get("SEQVISION_DEBUG"):
            raise
        print(f"seqvision train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
