"""The training loop: ``Trainer`` builds a run from a ``TrainConfig`` (``build``), then trains and validates
epoch by epoch (``fit``), checkpointing as it goes.

The pipeline is timm's (``seqvision.train.components``: RandomResizedCrop, RandAugment, random erasing, Mixup,
soft-target / label-smoothing cross-entropy, AdamW without decay on biases and norms, cosine schedule with
warm-up and cool-down) and ``ModelEmaV3``.

Exactness of ``--resume``: each sample's augmentation is seeded from (seed, epoch, index)
(``seqvision.data.SeededDataset``), the order of an epoch from (seed, epoch), and the process-wide RNGs
(dropout, drop-path, mixup) are saved in every checkpoint, so a run killed at any point and resumed from
its last checkpoint ends with the same numbers as one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from timm.data import create_transform
from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import ops
from ..data import ImageDataset, PaddedShard, SeededDataset, ShardedEpochSampler, collate, open_train_val
from ..errors import ConfigError, DivergedError, UserError
from ..evaluate import evaluate, iterate_batches
from ..models import guess_variant
from ..ops import fused
from ..runtime import amp_dtype, autocast, pick_device
from ..weights import load_weights
from . import checkpoint as ckpt
from . import components as parts
from .checkpoint import Progress, fresh_running
from .config import TrainConfig, resolve_config, scaled_lr
from .distributed import Dist, get_rng_state, seed_everything, set_rng_state
from .records import RunRecords
from .rundir import RunDir

# A run's saved position is only meaningful when these are unchanged on resume.
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


class Trainer:
    """One training run: ``build()`` everything from the config, then ``fit()``; ``close()`` afterwards.

    ``resume`` continues a run (its folder or a checkpoint); its saved config is used, with ``overrides`` (the
    keys given on the command line) applied on top. ``on_epoch`` is called with each epoch's metrics on rank 0
    (a progress display of a caller that runs many trainings).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        name: str = "custom",
        resume: str | Path | None = None,
        overwrite: bool = False,
        overrides: Mapping[str, Any] | None = None,
        on_epoch: Callable[[dict[str, float]], None] | None = None,
    ):
        self.on_epoch = on_epoch
        self.dist = Dist()
        self.device = pick_device(cfg.device, self.dist.local_rank)
        self.dist.init(self.device)
        self.resume_path: Path | None = None
        self.resume_state: dict[str, Any] | None = None
        if resume is not None:
            self.resume_path, self.resume_state = ckpt.read_training_checkpoint(resume)
            saved = {k: v for k, v in self.resume_state["config"].items() if k in TrainConfig.__dataclass_fields__}
            cfg = resolve_config(saved, overrides).replace(output=str(self.resume_path.parent))
        if cfg.output is None:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S") if self.dist.is_main else None
            cfg = cfg.replace(output=str(Path("runs") / f"{name}-{self.dist.broadcast(stamp)}"))
        self.cfg = cfg
        self.out = Path(cfg.output)
        self.run_dir = RunDir(self.out)
        stale = self.run_dir.claim(resume is not None, overwrite) if self.dist.is_main else []
        self.records = RunRecords(self.out, self.dist.is_main)
        if stale:
            self.records.log(f"removed {len(stale)} temporary file(s) left by an interrupted write: {', '.join(stale)}")
        self.progress = Progress()
        self.previous_engine = ops.get_engine()  # the run's engine choice is undone in close()
        self.t_start = self.t_segment = self.last_save = time.time()

    # -- building --------------------------------------------------------------------------------------
    def build(self) -> None:
        """Data, model, optimiser, schedule, precision, EMA, mixup and losses, from the config."""
        cfg, d = self.cfg, self.dist
        ops.set_engine(cfg.engine)
        if self.device.type == "cpu" and cfg.engine in ("auto", "fused"):
            fused.available()  # a first build of the kernels happens here, not inside epoch 1's timing
        seed_everything(cfg.seed)  # model initialisation: the same on every rank
        self.data_config = parts.eval_data_config(cfg)
        train, val = open_train_val(cfg.dataset, cfg.data_dir, upsample_to=cfg.img_size)
        self.class_names = train.class_names
        self.train_set = SeededDataset(ImageDataset(train.samples, parts.train_transform(cfg)), cfg.seed)
        self.val_set = ImageDataset(val.samples, create_transform(**self.data_config, is_training=False))
        self.num_classes = cfg.num_classes or len(self.class_names)
        if self.num_classes < len(self.class_names):
            raise ConfigError(f"num_classes {self.num_classes} < the {len(self.class_names)} classes of the data")
        self.batches_per_epoch = (len(self.train_set) // d.world_size) // cfg.batch_size
        if self.batches_per_epoch < 1:
            raise ConfigError(
                f"the training set ({len(self.train_set)} images over {d.world_size} process(es)) is smaller "
                f"than one batch of {cfg.batch_size}: lower --batch-size"
            )
        self.updates_per_epoch = math.ceil(self.batches_per_epoch / cfg.accum_steps)

        self._build_model()
        self.lr, self.global_batch = scaled_lr(cfg, d.world_size)
        # On the bare module (DDP's "module." prefix would defeat layer-wise decay); FSDP: the wrapped one.
        self.optimizer = parts.build_optimizer(self.core, cfg, self.lr)
        self.scheduler, self.total_epochs = parts.build_schedule(self.optimizer, cfg, self.updates_per_epoch)
        self._build_precision()
        if cfg.model_ema and self.sharded:
            raise ConfigError("model_ema is not supported with fsdp (the EMA copy would not be sharded)")
        self.ema = ModelEmaV3(self.core, decay=cfg.model_ema_decay) if cfg.model_ema else None
        self.mixup, self.train_loss = parts.build_losses(cfg, self.num_classes)

    def _build_precision(self) -> None:
        """bf16 autocast anywhere; fp16 on CUDA only, with a loss scaler."""
        cfg = self.cfg
        try:
            self.amp_dtype = amp_dtype(self.device, cfg.amp_dtype)
        except UserError as e:
            if cfg.amp:
                raise ConfigError(str(e)) from None
            self.amp_dtype = torch.bfloat16
        if cfg.amp and self.device.type == "cpu" and not ops.cpu_has_bf16():
            self.records.log(
                "warning: --amp on a CPU where oneDNN has no bf16 path (it needs AVX-512 or AMX): bf16 is far slower "
                "than float32 here; drop --amp"
            )
        self.scaler = NativeScaler(device=self.device.type) if cfg.amp and self.amp_dtype == torch.float16 else None

    def _build_model(self) -> None:
        """``self.core``, the bare model (what checkpoints and EMA hold), and ``self.model``, what trains."""
        cfg, fresh = self.cfg, self.resume_state is None
        if self.sharded and cfg.layer_decay:
            raise ConfigError("layer_decay is not supported with fsdp (parameter names change under FSDP)")
        if cfg.finetune and parts.is_timm_peer(cfg.model):
            raise ConfigError(f"finetune loads seqvision variants only; {cfg.model} is a timm model")
        model = parts.build_model(cfg, self.num_classes, pretrained=cfg.pretrained and not cfg.finetune and fresh)
        if cfg.finetune and fresh:
            info = load_weights(model, cfg.finetune, variant_hint=guess_variant)
            head = "a new classifier head" if info["head_reset"] else "its classifier head"
            self.records.log(f"fine-tuning from {cfg.finetune} ({info['format']} layout, {head})")
        if not fresh:
            model.load_state_dict(self.resume_state["model"])
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        self.channels_last = cfg.channels_last is True or (cfg.channels_last == "auto" and self.device.type == "cuda")
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.core = model
        self.n_params = sum(p.numel() for p in model.parameters())
        self.model = parts.wrap_for_processes(model, cfg, self.dist.enabled, self.device)

    # -- checkpoints -----------------------------------------------------------------------------------
    @property
    def sharded(self) -> bool:
        return self.cfg.fsdp and self.dist.enabled

    def checkpoint(self, epoch: int, step: int) -> dict[str, Any] | None:
        """The full training state (None on ranks other than 0). ``epoch``/``step``: where to continue."""
        model_sd = ckpt.model_state(self.core, self.sharded)  # collective under FSDP
        optim_sd = ckpt.optimizer_state(self.core, self.optimizer, self.sharded)
        if not self.dist.is_main:
            return None
        p = self.progress
        state = {
            "kind": ckpt.KIND,
            "version": ckpt.VERSION,
            "model": model_sd,
            "optimizer": optim_sd,
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            "step": step,
            "world_size": self.dist.world_size,
            "rng": get_rng_state(),
            "config": self.cfg.to_dict(),
            "model_name": self.cfg.model,
            "model_kwargs": dict(self.cfg.model_kwargs),
            "class_names": list(self.class_names),
            "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()},
            **p.to_state(p.train_seconds + time.time() - self.t_segment),
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.ema is not None:
            state["model_ema"] = {k: v.detach().cpu() for k, v in self.ema.module.state_dict().items()}
        return state

    def save(self, epoch: int, step: int, best: bool = False) -> None:
        state = self.checkpoint(epoch, step)
        if state is not None:
            ckpt.save_checkpoint(state, self.out, "last.pth", *(["best.pth"] if best else []))
        self.last_save = time.time()

    def _restore(self) -> tuple[int, int, dict[str, Any] | None]:
        """Load the resumed run's state; returns (epoch, batch) to continue from and the RNG state to set."""
        s, cfg = self.resume_state, self.cfg
        assert s is not None
        ckpt.restore_optimizer(self.core, self.optimizer, s["optimizer"], self.sharded)
        if self.scaler is not None and "scaler" in s:
            self.scaler.load_state_dict(s["scaler"])
        if self.ema is not None and "model_ema" in s:
            self.ema.module.load_state_dict(s["model_ema"])
        epoch, batch = s["epoch"], s["step"]
        self.progress = Progress.from_state(s, mid_epoch=batch > 0)
        rng = s["rng"] if batch else None
        same_layout = s["world_size"] == self.dist.world_size and all(
            s["config"][k] == getattr(cfg, k) for k in _BATCH_KEYS
        )
        if batch and not same_layout:  # the saved position means nothing with other batches
            self.records.log("the batch size or process count changed: the interrupted epoch starts again")
            batch, rng = 0, None
            self.progress.running = fresh_running()
            self.progress.num_updates = epoch * self.updates_per_epoch
        if same_layout and all(s["config"][k] == getattr(cfg, k) for k in _SCHEDULE_KEYS):
            self.scheduler.load_state_dict(s["scheduler"])
        else:
            self.records.log("the learning-rate schedule differs from the checkpoint's: following the new one")
        self.scheduler.step_update(num_updates=self.progress.num_updates)
        self.records.log(f"resuming {self.resume_path}: epoch {epoch + 1}, batch {batch}")
        return epoch, batch, rng

    # -- one epoch -------------------------------------------------------------------------------------
    def _loader(self, epoch: int, start_batch: int) -> DataLoader:
        cfg, d = self.cfg, self.dist
        sampler = ShardedEpochSampler(len(self.train_set), True, cfg.seed, d.rank, d.world_size)
        sampler.set_epoch(epoch, start=start_batch * cfg.batch_size)
        self.train_set.set_epoch(epoch)
        # Its own generator: creating the iterator must not draw from the global RNG that resumption restores.
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        return DataLoader(
            self.train_set,
            batch_size=cfg.batch_size,
            sampler=sampler,
            drop_last=True,
            generator=gen,
            num_workers=cfg.workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
        )

    def train_epoch(self, epoch: int, start_batch: int) -> dict[str, float]:
        cfg, d, p = self.cfg, self.dist, self.progress
        accum, n_batches = cfg.accum_steps, self.batches_per_epoch
        self.model.train()
        bar = self._bar(epoch, start_batch, n_batches)
        t0, seen = time.time(), 0
        params = [q for q in self.model.parameters() if q.requires_grad]
        batches = iterate_batches(self._loader(epoch, start_batch), on_error="fail")
        for b, (x, y) in enumerate(batches, start=start_batch):
            if b >= n_batches:  # DistributedSampler may pad; every rank runs exactly n_batches
                break
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.mixup is not None:
                x, y = self.mixup(x, y)
            group_start = (b // accum) * accum
            group = min(accum, n_batches - group_start)  # the last group of an epoch may be shorter
            update = b + 1 == group_start + group
            loss_value = self._step(x, y, group, update, params, epoch, b)
            p.running["loss_sum"] += loss_value * x.shape[0]
            p.running["samples"] += x.shape[0]
            seen += x.shape[0]
            if update:
                self.optimizer.zero_grad(set_to_none=True)
                p.running["updates"] += 1
                p.num_updates += 1
                if self.ema is not None:
                    self.ema.update(self.core, step=p.num_updates)
                self.scheduler.step_update(num_updates=p.num_updates)
            lr = self.optimizer.param_groups[0]["lr"]
            rate = seen * d.world_size / max(time.time() - t0, 1e-9)
            if bar is not None:
                bar.set_postfix_str(
                    f"loss {p.running['loss_sum'] / p.running['samples']:.4f}  lr {lr:.3g}  {rate:.0f} img/s"
                )
                bar.update(1)
            elif update and cfg.log_every_steps and p.running["updates"] % cfg.log_every_steps == 0:
                self.records.log(
                    f"  epoch {epoch + 1} step {b + 1}/{n_batches}  loss {loss_value:.4f}  "
                    f"lr {lr:.3g}  {rate:.0f} img/s"
                )
            if update and b + 1 < n_batches and self._step_checkpoint_due():
                self.save(epoch, b + 1)
        if bar is not None:
            bar.close()
        loss_sum, samples = d.sum([p.running["loss_sum"], p.running["samples"]], self.device)
        return {
            "train_loss": loss_sum / max(samples, 1),
            "lr": self.optimizer.param_groups[0]["lr"],
            "img_per_s": seen * d.world_size / max(time.time() - t0, 1e-9),
        }

    def _step(self, x: Tensor, y: Tensor, group: int, update: bool, params: list[Tensor], epoch: int, b: int) -> float:
        """Forward and backward of one batch (and the optimiser step when ``update``); returns its loss."""
        cfg, d = self.cfg, self.dist
        sync: contextlib.AbstractContextManager = contextlib.nullcontext()
        if not update and d.enabled and hasattr(self.model, "no_sync"):
            sync = self.model.no_sync()  # accumulate locally; all-reduce once per update
        elif d.enabled and hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2: the same
            self.model.set_requires_gradient_sync(update)
        with sync:
            with autocast(self.device, cfg.amp, self.amp_dtype):
                loss = self.train_loss(self.model(x), y)
            loss_value = loss.detach().float()
            self._check_finite(loss_value, epoch, b)
            if self.scaler is not None:
                self.scaler(
                    loss / group,
                    self.optimizer,
                    clip_grad=cfg.clip_grad,
                    clip_mode=cfg.clip_mode,
                    parameters=params,
                    need_update=update,
                )
            else:
                (loss / group).backward()
                if update:
                    if cfg.clip_grad is not None:
                        dispatch_clip_grad(params, cfg.clip_grad, mode=cfg.clip_mode)
                    self.optimizer.step()
        return loss_value.item()

    def _check_finite(self, loss: Tensor, epoch: int, batch: int) -> None:
        # every rank must stop together, or the others wait forever
        if self.dist.any(not bool(torch.isfinite(loss)), self.device):
            last = self.out / "last.pth"
            kept = f"the last good checkpoint, {last}, is unchanged" if last.exists() else "no checkpoint was written"
            raise DivergedError(
                f"the loss became {loss.item()} at epoch {epoch + 1}, batch {batch + 1}: training stopped and {kept}. "
                "Lower the learning rate (--lr), add gradient clipping (--clip-grad 1.0) or turn off float16 AMP."
            )

    def _step_checkpoint_due(self) -> bool:
        cfg = self.cfg
        by_steps = cfg.save_every_steps and self.progress.num_updates % cfg.save_every_steps == 0
        by_time = cfg.save_every_minutes and time.time() - self.last_save >= 60 * cfg.save_every_minutes
        return bool(self.dist.broadcast(bool(by_steps or by_time)))  # the clocks could differ; rank 0 decides

    def _bar(self, epoch: int, start: int, total: int) -> Any:
        show = self.cfg.progress
        if show == "auto":
            show = sys.stderr.isatty()
        if not show or not self.dist.is_main:
            return None
        return tqdm(
            total=total,
            initial=start,
            desc=f"epoch {epoch + 1}/{self.total_epochs}",
            unit="batch",
            dynamic_ncols=True,
            leave=False,
        )

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Loss, top-1 and top-5 on the whole validation set, each rank scoring its shard."""
        d = self.dist
        shard = PaddedShard(self.val_set, d.rank, d.world_size)
        bs = self.cfg.eval_batch_size or 2 * self.cfg.batch_size
        loader = DataLoader(shard, batch_size=bs, shuffle=False, num_workers=self.cfg.workers, collate_fn=collate)
        r = evaluate(
            model,
            loader,
            self.device,
            self.cfg.amp,
            num_classes=self.num_classes,
            on_error="fail",
            amp_dtype=self.amp_dtype,
            channels_last=self.channels_last,
            allow_empty=True,
        )
        loss, top1, top5, n = d.sum([r.loss_sum, r.correct1, r.correctk, r.n], self.device)
        return {"val_loss": loss / max(n, 1), "top1": 100 * top1 / max(n, 1), "top5": 100 * top5 / max(n, 1)}

    # -- the whole run ---------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Build, train every remaining epoch, and write the summary; returns it (empty on ranks other than 0)."""
        cfg, d = self.cfg, self.dist
        self.build()
        start_epoch, start_batch, rng_state = self._restore() if self.resume_state is not None else (0, 0, None)
        self.resume_state = None  # free the memory
        self._describe()
        if cfg.tensorboard:
            self.records.open_tensorboard(start_epoch)
        self.last_save = self.t_segment = time.time()
        for epoch in range(start_epoch, self.total_epochs):
            # The process-wide RNGs (dropout, drop-path, mixup) restart from (seed, epoch, rank) every epoch,
            # or from the checkpoint's state when resuming inside an epoch.
            seed_everything(cfg.seed, epoch, d.rank)
            if rng_state is not None and epoch == start_epoch:
                set_rng_state(rng_state)
            t0 = time.time()
            train = self.train_epoch(epoch, start_batch if epoch == start_epoch else 0)
            metrics = {"epoch": epoch + 1, **train, **self.validate(self.core)}
            if self.ema is not None:
                ema = self.validate(self.ema.module)
                metrics.update(ema_top1=ema["top1"], ema_val_loss=ema["val_loss"])
            metrics["epoch_seconds"] = time.time() - t0
            p = self.progress
            p.history.append(metrics)
            is_best = metrics["top1"] > p.best_top1
            if is_best:
                p.best_top1, p.best_epoch = metrics["top1"], epoch + 1
            p.running = fresh_running()
            self.save(epoch + 1, 0, best=is_best)
            self.records.epoch(metrics, p.history, self.total_epochs, is_best)
            if self.on_epoch is not None and d.is_main:
                self.on_epoch(metrics)
        self.progress.train_seconds += time.time() - self.t_segment
        return self._finish()

    def _describe(self) -> None:
        cfg, d, log = self.cfg, self.dist, self.records.log
        per = f"{cfg.batch_size} per process x {d.world_size} process(es) x {cfg.accum_steps} accumulation step(s)"
        if cfg.lr_scaling == "linear":
            lr_msg = (
                f"lr {cfg.lr:g} is for a global batch of {cfg.lr_base_batch}; this run's global batch is "
                f"{self.global_batch} ({per}) -> lr {self.lr:.4g} (linear scaling)"
            )
        else:
            lr_msg = f"lr {self.lr:g} for a global batch of {self.global_batch} ({per}), not scaled"
        amp = f"AMP {str(self.amp_dtype).removeprefix('torch.')}" if cfg.amp else "float32"
        wrap = "FSDP" if self.sharded else "DDP" if d.enabled else "single process"
        log(f"seqvision train -> {self.out}")
        log(
            f"  model    {cfg.model} {cfg.model_kwargs or ''} {self.n_params:,} parameters, {cfg.img_size} px, "
            f"{self.num_classes} classes"
        )
        log(
            f"  data     {cfg.dataset}: {len(self.train_set):,} training / {len(self.val_set):,} validation "
            f"images, {self.batches_per_epoch} batches per epoch per process"
        )
        log(f"  optim    {cfg.opt}, {lr_msg}")
        log(
            f"  schedule {cfg.sched}, {cfg.epochs} epochs + {cfg.cooldown_epochs} cool-down, "
            f"warm-up {cfg.warmup_epochs} -> {self.total_epochs} epochs, {self.updates_per_epoch} updates each"
        )
        log(
            f"  engine   {self.device}, {amp}, {wrap}, BiLSTM2D engine {parts.engine_description(self.device)}"
            + (", torch.compile" if cfg.compile else "")
            + (", gradient checkpointing" if cfg.grad_checkpointing else "")
        )

    def _finish(self) -> dict[str, Any]:
        d, p = self.dist, self.progress
        updates = d.gather(p.num_updates)
        self.records.close()
        if not d.is_main:
            return {}
        last = p.history[-1] if p.history else {}
        summary = {
            "best_top1": p.best_top1,
            "best_epoch": p.best_epoch,
            "final_top1": last.get("top1"),
            "final_top5": last.get("top5"),
            "final_train_loss": last.get("train_loss"),
            "epochs": self.total_epochs,
            "train_seconds": round(p.train_seconds, 2),
            "wall_seconds": round(time.time() - self.t_start, 2),
            "parameters": self.n_params,
            "model": self.cfg.model,
            "dataset": self.cfg.dataset,
            "global_batch": self.global_batch,
            "lr": self.lr,
            "world_size": d.world_size,
            "updates_per_rank": updates,
            "device": str(self.device),
            "output": str(self.out),
        }
        self.records.finish(summary, p.history)
        self.records.log(
            f"done: best top-1 {p.best_top1:.2f} (epoch {p.best_epoch}), "
            f"{summary['train_seconds']:.0f} s training; {self.out}/best.pth, metrics.csv, curves.png"
        )
        return summary

    def close(self) -> None:
        """Undo the run's engine choice, release its folder and leave the process group."""
        ops.set_engine(self.previous_engine)
        self.records.close()
        self.run_dir.release()
        self.dist.close()


def train(
    cfg: TrainConfig,
    name: str = "custom",
    resume: str | Path | None = None,
    overwrite: bool = False,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run a training job; returns its summary (empty on ranks other than 0). See ``Trainer``."""
    trainer = Trainer(cfg, name, resume, overwrite, overrides)
    try:
        return trainer.fit()
    finally:
        trainer.close()
