"""The parts of a run that the config decides, each built by one function: transforms, model, process
wrapping, optimiser, schedule and losses (timm's implementations throughout)."""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from .. import ops
from ..errors import ConfigError, UnknownModelError
from ..models import SequencerBlock, create_model, resolve_name
from ..ops import fused
from .config import TrainConfig


def eval_data_config(cfg: TrainConfig) -> dict[str, Any]:
    """The evaluation preprocessing of the run, in timm's data-config form (recorded in checkpoints)."""
    return {
        "input_size": (3, cfg.img_size, cfg.img_size),
        "interpolation": cfg.interpolation,
        "mean": tuple(cfg.mean),
        "std": tuple(cfg.std),
        "crop_pct": cfg.crop_pct,
        "crop_mode": "center",
    }


def train_transform(cfg: TrainConfig) -> Any:
    """RandomResizedCrop, flip, colour jitter, RandAugment, normalisation and random erasing."""
    return create_transform(
        cfg.img_size,
        is_training=True,
        scale=tuple(cfg.scale),
        ratio=tuple(cfg.ratio),
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.aa,
        interpolation=cfg.train_interpolation,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        re_prob=cfg.reprob,
        re_mode=cfg.remode,
        re_count=cfg.recount,
    )


def is_timm_peer(name: str) -> bool:
    """A timm model name that is not a seqvision variant (trained with the same recipe, for comparison)."""
    try:
        resolve_name(name)
    except UnknownModelError:
        return timm.is_model(name)
    return False


def build_model(cfg: TrainConfig, num_classes: int, pretrained: bool) -> nn.Module:
    """A seqvision variant, or a timm model of that name (a peer trained with the same recipe)."""
    common = dict(num_classes=num_classes, drop_path_rate=cfg.drop_path, drop_rate=cfg.drop, **cfg.model_kwargs)
    if is_timm_peer(cfg.model):
        # img_size sizes a ViT's position embedding; models without one take no such argument
        for extra in ({"img_size": cfg.img_size} if "img_size" not in common else {}, {}):
            try:
                return timm.create_model(cfg.model, pretrained=pretrained, **extra, **common)
            except TypeError as e:
                error = e
        raise ConfigError(f"model_kwargs do not build a {cfg.model}: {str(error).splitlines()[0]}")
    try:
        return create_model(cfg.model, pretrained=pretrained, img_size=cfg.img_size, **common)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model_kwargs do not build a {cfg.model}: {str(e).splitlines()[0]}") from None


def wrap_for_processes(model: nn.Module, cfg: TrainConfig, distributed: bool, device: torch.device) -> nn.Module:
    """FSDP (each Sequencer block sharded, then the rest) or DDP across processes, then torch.compile if asked."""
    if distributed and cfg.fsdp:
        for block in (m for m in model.modules() if isinstance(m, SequencerBlock)):
            fully_shard(block)
        fully_shard(model)
    elif distributed:
        model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model, dynamic=False)  # static shapes: a graph per batch shape
    return model


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """timm's optimiser factory: no weight decay on biases and norms, optional layer-wise decay."""
    return create_optimizer_v2(
        model,
        opt=cfg.opt,
        lr=lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        layer_decay=cfg.layer_decay,
        # torch's fused Adam(W): one kernel for every parameter instead of a loop over tensors, same rule
        **({"fused": True} if cfg.opt.lower() in ("adam", "adamw") else {}),
    )


def build_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, updates_per_epoch: int) -> tuple[Any, int]:
    """(scheduler stepped every update, total epochs including cool-down)."""
    return create_scheduler_v2(
        optimizer,
        sched=cfg.sched,
        num_epochs=cfg.epochs,
        cooldown_epochs=cfg.cooldown_epochs,
        warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )


def build_losses(cfg: TrainConfig, num_classes: int) -> tuple[Mixup | None, nn.Module]:
    """(mixup / cutmix or None, the training loss that fits it)."""
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            prob=cfg.mixup_prob,
            switch_prob=cfg.mixup_switch_prob,
            mode=cfg.mixup_mode,
            label_smoothing=cfg.smoothing,
            num_classes=num_classes,
        )
        return mixup, SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(cfg.smoothing)
    return None, nn.CrossEntropyLoss()


def engine_description(device: torch.device) -> str:
    """The BiLSTM2D engine choice as the log shows it: what ``auto`` resolves to on ``device``."""
    engine = ops.get_engine()
    if engine != "auto":
        return engine
    if device.type == "cuda":
        return "auto (Triton where it covers the layer, cuDNN elsewhere)"
    if not fused.available():
        return f"auto (reference: the fused kernel is unavailable, {fused.load_error()})"
    return f"auto (fused C++ kernel, {fused.parallel_threads()} threads)"
