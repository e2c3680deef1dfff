"""Training settings: ``TrainConfig`` declares each setting once (type, default, allowed range, help text).

Recipes are YAML files of these settings (``seqvision/configs/``, shipped in the package); a recipe may name
another under ``base:`` and change some of its keys. The command line's shortcut flags and its ``--set KEY=VALUE``
pairs are layers on top, described by ``flag_specs()`` and parsed by ``parse_set()``. Where a value is not given,
the default is timm's ``train.py`` default unless the paper says otherwise.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..data import DATASETS
from ..errors import ConfigError, UnknownModelError
from ..images import CROP_PCT_RANGE, MAX_IMG_SIZE
from ..models import Sequencer, resolve_name
from ..ops import ENGINES

# BiLSTM2D engines a run may ask for ("traceable" is the export-time path, not a training choice).
TRAIN_ENGINES = tuple(e for e in ENGINES if e != "traceable")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "box", "hamming", "lanczos")
MAX_SEED = 2**32 - 1
# Keys the trainer passes to the model itself; model_kwargs may set any other Sequencer argument.
_TRAINER_MODEL_KEYS = ("num_classes", "img_size", "drop_rate", "drop_path_rate")


@dataclass(frozen=True)
class Check:
    """A range a value must be in, and how an error message names it."""

    ok: Callable[[Any], bool]
    what: str


UNIT = Check(lambda v: 0 <= v <= 1, "between 0 and 1")
NON_NEGATIVE = Check(lambda v: v >= 0, "0 or more")
POSITIVE = Check(lambda v: v > 0, "above 0")
COUNT = Check(lambda v: v >= 1, "at least 1")


def setting(
    default: Any,
    help: str = "",
    *,
    check: Check | None = None,
    choices: tuple[Any, ...] | None = None,
    flag: bool = False,
    metavar: str | None = None,
) -> Any:
    """A TrainConfig field. ``flag=True`` also gives it a command-line shortcut (``--img-size`` for ``img_size``)."""
    meta = {"help": help, "check": check, "choices": choices, "flag": flag, "metavar": metavar}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run, checked when built (``TrainConfig.from_dict`` / ``resolve_config``)."""

    # model
    model: str = setting("sequencer2d_s", "variant name (seqvision models), or a timm model name", flag=True)
    model_kwargs: dict[str, Any] = setting({}, "other arguments of the model, e.g. layers, embed_dims")
    pretrained: bool = setting(False, "start from the published ImageNet-1K weights", flag=True)
    finetune: str | None = setting(
        None, "start from these weights (any format; new head if needed)", flag=True, metavar="CKPT"
    )
    num_classes: int | None = setting(None, "classifier outputs (default: the data set's classes)", check=COUNT)
    drop_path: float = setting(0.0, "stochastic depth rate", check=UNIT)
    drop: float = setting(0.0, "dropout before the classifier", check=UNIT)
    # data
    dataset: str = setting("digits", "built-in set, ImageFolder tree or torchvision set", choices=DATASETS, flag=True)
    data_dir: str | None = setting(
        None, "ImageFolder root (train/, val/) or a torchvision data set's folder", flag=True
    )
    img_size: int = setting(
        224,
        "training and evaluation size",
        check=Check(lambda v: 1 <= v <= MAX_IMG_SIZE, f"between 1 and {MAX_IMG_SIZE}"),
        flag=True,
    )
    mean: list[float] = setting([0.485, 0.456, 0.406], "normalisation mean per channel")
    std: list[float] = setting([0.229, 0.224, 0.225], "normalisation standard deviation per channel")
    crop_pct: float = setting(
        0.875,
        "evaluation: resize to img_size / crop_pct, then centre crop",
        check=Check(
            lambda v: CROP_PCT_RANGE[0] <= v <= CROP_PCT_RANGE[1],
            f"between {CROP_PCT_RANGE[0]:g} and {CROP_PCT_RANGE[1]:g}",
        ),
    )
    interpolation: str = setting("bicubic", "evaluation resize", choices=INTERPOLATIONS)
    train_interpolation: str = setting(
        "random", "training resize (random: bilinear or bicubic)", choices=("random", *INTERPOLATIONS)
    )
    scale: list[float] = setting([0.08, 1.0], "RandomResizedCrop area range")
    ratio: list[float] = setting([0.75, 1.3333333333333333], "RandomResizedCrop aspect-ratio range")
    hflip: float = setting(0.5, "horizontal flip probability", check=UNIT)
    color_jitter: float | None = setting(0.4, "colour jitter strength (null: off)", check=NON_NEGATIVE)
    aa: str | None = setting(None, "RandAugment / AutoAugment policy, e.g. rand-m9-mstd0.5-inc1")
    reprob: float = setting(0.0, "random erasing probability", check=UNIT)
    remode: str = setting("pixel", "random erasing fill", choices=("const", "rand", "pixel"))
    recount: int = setting(1, "random erasing count", check=COUNT)
    mixup: float = setting(0.0, "mixup alpha (0: off)", check=NON_NEGATIVE)
    cutmix: float = setting(0.0, "cutmix alpha (0: off)", check=NON_NEGATIVE)
    mixup_prob: float = setting(1.0, "probability of mixing a batch", check=UNIT)
    mixup_switch_prob: float = setting(0.5, "probability of cutmix instead of mixup", check=UNIT)
    mixup_mode: str = setting("batch", "mix per batch, pair or element", choices=("batch", "pair", "elem"))
    smoothing: float = setting(0.1, "label smoothing", check=Check(lambda v: 0 <= v < 1, "at least 0 and below 1"))
    workers: int = setting(4, "DataLoader worker processes", check=NON_NEGATIVE, flag=True)
    # optimisation
    epochs: int = setting(300, "cosine schedule length (cool-down epochs come on top)", check=COUNT, flag=True)
    cooldown_epochs: int = setting(0, "epochs at min_lr after the schedule", check=NON_NEGATIVE)
    warmup_epochs: int = setting(5, "linear warm-up from warmup_lr", check=NON_NEGATIVE)
    warmup_lr: float = setting(1e-5, "learning rate at the start of warm-up", check=NON_NEGATIVE)
    min_lr: float = setting(0.0, "learning rate at the end of the schedule", check=NON_NEGATIVE)
    sched: str = setting("cosine", "timm scheduler name")
    opt: str = setting("adamw", "timm optimiser name")
    lr: float = setting(1e-3, "for the recipe's global batch lr_base_batch", check=POSITIVE, flag=True)
    lr_base_batch: int = setting(1024, "the global batch that lr is meant for", check=POSITIVE)
    lr_scaling: str = setting("linear", "scale lr to the global batch actually used", choices=("linear", "none"))
    weight_decay: float = setting(0.05, "AdamW weight decay (not on biases and norms)", check=NON_NEGATIVE)
    layer_decay: float | None = setting(None, "layer-wise learning-rate decay", check=POSITIVE)
    momentum: float = setting(0.9, "SGD momentum", check=NON_NEGATIVE)
    batch_size: int = setting(128, "per process", check=COUNT, flag=True)
    accum_steps: int = setting(1, "gradient accumulation", check=COUNT, flag=True)
    clip_grad: float | None = setting(None, "gradient clipping threshold (null: off)", check=POSITIVE, flag=True)
    clip_mode: str = setting("norm", "what clip_grad bounds", choices=("norm", "value", "agc"))
    model_ema: bool = setting(False, "keep an exponential moving average of the weights", flag=True)
    model_ema_decay: float = setting(0.9998, "EMA decay per update", check=UNIT)
    # engine
    device: str = setting("auto", "auto, cpu, cuda, cuda:1 ...", flag=True)
    amp: bool = setting(False, "mixed precision", flag=True)
    amp_dtype: str = setting(
        "auto",
        "auto: float16 on CUDA (with a loss scaler), bfloat16 on the CPU",
        choices=("auto", "bfloat16", "float16"),
        flag=True,
    )
    grad_checkpointing: bool = setting(False, "recompute each block in backward (less memory)", flag=True)
    compile: bool = setting(False, "torch.compile the model", flag=True)
    engine: str = setting("auto", "BiLSTM2D engine", choices=TRAIN_ENGINES, flag=True)
    channels_last: bool | str = setting("auto", "NHWC stem input (auto: on CUDA)", choices=("auto", True, False))
    fsdp: bool = setting(False, "FSDP instead of DDP", flag=True)
    seed: int = setting(
        0,
        "seed of initialisation, order and augmentation",
        check=Check(lambda v: 0 <= v <= MAX_SEED, f"between 0 and {MAX_SEED}"),
        flag=True,
    )
    # records
    output: str | None = setting(None, "run directory (default: runs/<recipe>-<date-time>)")
    eval_batch_size: int | None = setting(None, "evaluation batch (default: 2 x batch_size)", check=COUNT)
    save_every_steps: int = setting(0, "mid-epoch checkpoint every N updates (0: off)", check=NON_NEGATIVE)
    save_every_minutes: float = setting(
        10.0, "mid-epoch checkpoint after this many minutes (0: off)", check=NON_NEGATIVE
    )
    progress: bool | str = setting("auto", "progress bars (auto: on a terminal)", choices=("auto", True, False))
    tensorboard: bool = setting(True, "write TensorBoard logs")
    log_every_steps: int = setting(50, "a log line every N updates when not showing bars (0: off)", check=NON_NEGATIVE)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """A checked config from a mapping of settings (missing keys take their defaults)."""
        unknown = [k for k in values if k not in _FIELDS]
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r}{_did_you_mean(unknown[0])}")
        checked = {k: _checked(k, v) for k, v in values.items()}
        cfg = cls(**checked)
        cfg._check_together()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain values (what checkpoints store and ``--print-config`` prints)."""
        return copy.deepcopy({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    def replace(self, **changes: Any) -> TrainConfig:
        """A checked copy with ``changes`` applied."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def _check_together(self) -> None:
        for k, top in (("scale", 1.0), ("ratio", float("inf"))):
            v = getattr(self, k)
            if not (len(v) == 2 and 0 < v[0] <= v[1] <= top):
                bound = " <= 1" if top == 1.0 else ""
                raise ConfigError(f"{k} must be two numbers [low, high] with 0 < low <= high{bound}, got {v!r}")
        for k in ("mean", "std"):
            v = getattr(self, k)
            if len(v) != 3 or (k == "std" and min(v) <= 0):
                raise ConfigError(
                    f"{k} must be three numbers (one per RGB channel{', above 0' if k == 'std' else ''}), got {v!r}"
                )
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise ConfigError(f"mixup / cutmix need an even batch size, got {self.batch_size}")
        _check_model_kwargs(self.model, self.model_kwargs)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, list(_FIELDS), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _checked(key: str, value: Any) -> Any:
    """``value`` converted to ``key``'s declared type (an int where a float is declared, a tuple as a list) and
    checked against its choices and range; ConfigError naming the key otherwise."""
    meta = _FIELDS[key].metadata
    value = _of_type(key, value, _TYPES[key])
    if value is None:
        return None
    choices = meta["choices"]
    if choices is not None and not any(value == c and type(value) is type(c) for c in choices):
        shown = ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in choices)
        raise ConfigError(f"{key} must be one of {shown}, got {value!r}")
    check = meta["check"]
    if check is not None and not check.ok(value):
        raise ConfigError(f"{key} must be {check.what}, got {value}")
    return value


def _of_type(key: str, value: Any, tp: Any) -> Any:
    if isinstance(tp, types.UnionType):
        members = typing.get_args(tp)
        if value is None and type(None) in members:
            return None
        first_error = None
        for member in (m for m in members if m is not type(None)):
            try:
                return _of_type(key, value, member)
            except ConfigError as e:
                first_error = first_error or e
        raise first_error  # type: ignore[misc]
    origin = typing.get_origin(tp) or tp
    if origin is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if origin is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if origin is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if origin is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)) or any(
            isinstance(x, bool) or not isinstance(x, (int, float)) for x in value
        ):
            raise ConfigError(f"{key} must be a list of numbers, got {value!r}")
        return [float(x) for x in value]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping of names to values, got {value!r}")
        return copy.deepcopy(dict(value))
    raise TypeError(f"TrainConfig.{key}: unsupported type {tp}")


def _check_model_kwargs(model: str, kwargs: Mapping[str, Any]) -> None:
    try:
        resolve_name(model)
    except UnknownModelError:
        return  # a timm model, or a name the model factory will refuse: checked when the model is built
    allowed = [p for p in inspect.signature(Sequencer).parameters if p not in _TRAINER_MODEL_KEYS]
    for k in kwargs:
        if k in _TRAINER_MODEL_KEYS:
            raise ConfigError(
                f"model_kwargs.{k}: set it with the training key instead (num_classes, img_size, drop, drop_path)"
            )
        if k not in allowed:
            close = difflib.get_close_matches(k, allowed, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f"; Sequencer takes {', '.join(allowed)}"
            raise ConfigError(f"model_kwargs.{k} is not an argument of {model}{hint}")


# -- layers: recipe <- command line ---------------------------------------------------------------------------
def merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """``a`` updated with ``b``; nested mappings (model_kwargs) are merged key by key."""
    out = copy.deepcopy(dict(a))
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else copy.deepcopy(v)
    return out


def resolve_config(recipe: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Defaults <- ``recipe`` <- ``overrides``, checked; an unknown key is named with its layer.

    A recipe's ``model_kwargs`` belong to its ``model``: an override that names another model without giving
    ``model_kwargs`` starts from that model's own arguments.
    """
    overrides = dict(overrides or {})
    for source, layer in (("recipe", recipe), ("override", overrides)):
        unknown = [k for k in layer if k not in _FIELDS]
        if unknown:
            raise ConfigError(f"unknown {source} key {unknown[0]!r}{_did_you_mean(unknown[0])}")
    if overrides.get("model", recipe.get("model")) != recipe.get("model") and "model_kwargs" not in overrides:
        recipe = {k: v for k, v in recipe.items() if k != "model_kwargs"}
    return TrainConfig.from_dict(merge(recipe, overrides))


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
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a mapping of keys")
            node = child
        if len(parts) > 1 and parts[0] in _FIELDS and _TYPES[parts[0]] != dict[str, Any]:
            raise ConfigError(f"--set {item!r}: {parts[0]} has no keys of its own")
        node[parts[-1]] = value
    return out


def scaled_lr(cfg: TrainConfig, world_size: int = 1) -> tuple[float, int]:
    """(learning rate for this run's global batch, that global batch): linear scaling from lr_base_batch."""
    global_batch = cfg.batch_size * cfg.accum_steps * world_size
    if cfg.lr_scaling == "none":
        return cfg.lr, global_batch
    return cfg.lr * global_batch / cfg.lr_base_batch, global_batch


def flag_specs() -> list[dict[str, Any]]:
    """The settings that have command-line shortcuts: name, type, help, choices and metavar of each."""
    specs = []
    for name, f in _FIELDS.items():
        if f.metadata["flag"]:
            tp = _TYPES[name]
            base = (
                next((m for m in typing.get_args(tp) if m is not type(None)), tp)
                if isinstance(tp, types.UnionType)
                else tp
            )
            specs.append(
                {
                    "name": name,
                    "type": base,
                    "help": f.metadata["help"],
                    "choices": f.metadata["choices"],
                    "metavar": f.metadata["metavar"],
                }
            )
    return specs


# -- recipes ----------------------------------------------------------------------------------------------------
def _recipe_dir() -> Any:
    return resources.files("seqvision").joinpath("configs")


def recipe_names() -> list[str]:
    """The recipes shipped in the package (``seqvision/configs/*.yaml``), by name."""
    return sorted(p.name.removesuffix(".yaml") for p in _recipe_dir().iterdir() if p.name.endswith(".yaml"))


def recipe_text(name: str) -> str:
    """The YAML text of a shipped recipe."""
    return _recipe_dir().joinpath(f"{name}.yaml").read_text()


def load_recipe(name_or_path: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A recipe as a dict: a YAML file's path or the name of a shipped recipe.

    A recipe may name another under ``base:`` (a file beside it, or a shipped recipe); its keys are applied on
    top of that one's.
    """
    path = Path(name_or_path)
    if path.is_file():
        where, read = str(path), path.read_text
    elif name_or_path in recipe_names():
        where, read = f"recipe {name_or_path}", lambda: recipe_text(name_or_path)
    else:
        raise ConfigError(f"no recipe {name_or_path!r}: give a YAML file or one of {', '.join(recipe_names())}")
    try:
        recipe = yaml.safe_load(read()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read {where}: {str(e).splitlines()[0]}") from None
    if not isinstance(recipe, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values")
    base = recipe.pop("base", None)
    if base:
        if base in _seen:
            raise ConfigError(f"{where}: 'base: {base}' makes a cycle")
        sibling = path.parent / f"{base}.yaml"
        parent = load_recipe(str(sibling) if path.is_file() and sibling.is_file() else str(base), (*_seen, base))
        recipe = merge(parent, recipe)
    return recipe
