"""``seqvision study resolution``: does Sequencer2D keep its accuracy at other input sizes better than
peers of the same size that were trained the same way?

The paper's resolution-adaptability claim compares a Sequencer2D with ViTs and CNNs trained at one size
and tested at others. This study makes that comparison end to end on real images: a small Sequencer2D and
timm peers with about as many parameters (a ConvNeXt, a ViT whose position embedding is interpolated to
each input size, a ResNet) are trained by ``seqvision train``'s trainer with one recipe at one input size,
for several seeds; every model is evaluated at 0.5x to 2x that size (``seqvision.analysis.resolution``),
and each architecture's effective receptive field is taken (``seqvision.analysis.erf``).

Output (``--output``): ``resolution.csv`` (one row per architecture, seed and test size),
``summary.csv`` (per architecture and size: mean, spread and the drop from the training size),
``erf.csv`` (per architecture, seed and layer: ERF area and cross share), ``study.json`` (settings,
parameter counts, training summaries, all rows, timings), ``resolution.png`` (top-1 against test size,
mean and spread over seeds), ``erf_<architecture>.png`` (one ERF panel per architecture) and, under
``runs/``, every training run; a run that is already there (finished or interrupted) is reused or resumed.
The statistics and figures are in ``seqvision.analysis.study_results``.
"""

from __future__ import annotations

import contextlib
import math
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import BUILTIN_SETS, DATASETS, LabelledImages, open_dataset
from ..errors import StudyError
from ..evaluate import eval_loader, eval_transform
from ..files import write_csv, write_json
from ..inference import LoadedModel
from ..runtime import pick_device
from ..train import TrainConfig, Trainer, resolve_config
from .erf import default_layers, effective_receptive_field, erf_stats, log_maps, shared_minmax
from .resolution import DEFAULT_SCALES, resolution_sweep, sweep_sizes
from .study_results import centre_patch, cross_share, plot_erf_panel, plot_resolution, summarise
from .study_runner import Progress, run_in_workers, worker_progress


@dataclass(frozen=True)
class Architecture:
    """One contender: a seqvision variant or timm model name and the arguments that size it."""

    key: str
    label: str
    model: str
    kwargs: dict[str, Any]


# About half a million parameters each (within 6% of the Sequencer2D's). The CNNs share the Sequencer2D's
# feature grid: a stride-4 stem, then one 2x downsampling (at 32 px: 8 x 8, then 4 x 4), their later stages
# dilated instead of strided (timm's output_stride=8) so that no model runs out of pixels at the 0.5x size.
# The ViT's 8 px patches give it the Sequencer2D's final 4 x 4 grid, as DeiT's 16 px patches at 224 px give
# it the 14 x 14 grid of Sequencer2D's later stages in the paper.
ARCHITECTURES: dict[str, Architecture] = {
    a.key: a
    for a in (
        Architecture(
            "sequencer2d",
            "Sequencer2D",
            "sequencer2d_s",
            dict(
                layers=[1, 1, 2, 1],
                patch_sizes=[4, 2, 1, 1],
                embed_dims=[48, 96, 96, 96],
                hidden_sizes=[12, 24, 24, 24],
            ),
        ),
        Architecture(
            "convnext", "ConvNeXt", "convnext_atto", dict(depths=[1, 1, 2, 1], dims=[24, 48, 96, 160], output_stride=8)
        ),
        Architecture(
            "vit",
            "ViT (interpolated pos. embedding)",
            "vit_tiny_patch16_224",
            dict(patch_size=8, embed_dim=100, depth=4, num_heads=4, dynamic_img_size=True),
        ),
        Architecture(
            "resnet",
            "ResNet",
            "resnet18",
            dict(layers=[1, 1, 1, 1], channels=[32, 64, 96, 128], stem_width=32, output_stride=8),
        ),
    )
}

# The one recipe every architecture is trained with (``seqvision train`` keys; the digits recipe's
# choices: AdamW with warm-up and cosine decay, light scale augmentation, no flips for digits).
RECIPE: dict[str, Any] = {
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "crop_pct": 1.0,
    "interpolation": "bicubic",
    "train_interpolation": "bicubic",
    "scale": [0.6, 1.0],
    "ratio": [0.8, 1.25],
    "hflip": 0.0,
    "color_jitter": None,
    "smoothing": 0.1,
    "warmup_epochs": 1,
    "min_lr": 1e-5,
    "lr_base_batch": 32,
    "weight_decay": 0.05,
    "save_every_minutes": 0.0,
    "tensorboard": False,
    "progress": False,
    "log_every_steps": 0,
}

DEFAULT_EPOCHS = 8
DEFAULT_SEEDS = 3
MIN_IMG_SIZE = 16


@dataclass
class StudySettings:
    """What ``seqvision study resolution`` runs; the defaults are its command-line defaults."""

    dataset: str = "mnist5k"
    data_dir: str | None = None
    img_size: int = 32
    epochs: int = DEFAULT_EPOCHS
    seeds: int = DEFAULT_SEEDS
    models: list[str] = field(default_factory=lambda: list(ARCHITECTURES))
    scales: list[float] = field(default_factory=lambda: list(DEFAULT_SCALES))
    batch_size: int = 32
    lr: float = 2e-3
    val_images: int | None = None
    erf_images: int = 64
    device: str = "auto"
    workers: int = 0
    threads: int | None = None
    jobs: int | None = None  # None: default_jobs()
    output: str = "results/study-resolution"
    overwrite: bool = False


def default_jobs(s: StudySettings) -> int:
    """Runs at a time when ``--jobs`` is not given: 2 on a CPU with two or more threads (so small a model keeps
    one thread busy, not two), else 1 (a GPU, or one thread)."""
    return 1 if pick_device(s.device).type != "cpu" else min(2, s.threads or torch.get_num_threads())


def check_settings(s: StudySettings) -> StudySettings:
    """``s`` with the models de-duplicated; StudyError (one line) for values that cannot work together."""
    unknown = [m for m in s.models if m not in ARCHITECTURES]
    if unknown:
        raise StudyError(f"unknown architecture {unknown[0]!r}; choose from {', '.join(ARCHITECTURES)}")
    if not s.models:
        raise StudyError(f"name at least one architecture ({', '.join(ARCHITECTURES)})")
    s.models = list(dict.fromkeys(s.models))
    if s.dataset not in DATASETS:
        raise StudyError(f"unknown data set {s.dataset!r}; choose one of {', '.join(DATASETS)}")
    if s.dataset in BUILTIN_SETS and s.data_dir is not None:
        raise StudyError(f"{s.dataset} is built in: drop --data-dir, or add --dataset folder / cifar10 / ...")
    if s.dataset not in BUILTIN_SETS and s.data_dir is None:
        raise StudyError(f"--dataset {s.dataset} needs --data-dir")
    if s.img_size < MIN_IMG_SIZE:
        raise StudyError(f"--img-size must be at least {MIN_IMG_SIZE} (so that 0.5x leaves 8 px), got {s.img_size}")
    if s.jobs is None:
        s.jobs = default_jobs(s)
    for name, value in (("epochs", s.epochs), ("seeds", s.seeds), ("batch_size", s.batch_size), ("jobs", s.jobs)):
        if value < 1:
            raise StudyError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not s.scales or any(not (x > 0 and math.isfinite(x)) for x in s.scales):
        raise StudyError(f"--scales must be numbers above 0, got {s.scales}")
    if not (s.lr > 0 and math.isfinite(s.lr)):
        raise StudyError(f"--lr must be a number above 0, got {s.lr}")
    return s


def study_sizes(s: StudySettings) -> list[int]:
    """The sweep's input sizes: ``scales`` x the training size, always including the training size itself."""
    return sorted(set(sweep_sizes(s.img_size, s.scales)) | {s.img_size})


def run_config(arch: Architecture, seed: int, s: StudySettings, out: Path) -> TrainConfig:
    """The ``seqvision train`` config of one run: the one recipe, this architecture and seed."""
    overrides = {
        "model": arch.model,
        "model_kwargs": dict(arch.kwargs),
        "dataset": s.dataset,
        "data_dir": s.data_dir,
        "img_size": s.img_size,
        "epochs": s.epochs,
        "batch_size": s.batch_size,
        "lr": s.lr,
        "seed": seed,
        "device": s.device,
        "workers": s.workers,
        "output": str(out / "runs" / f"{arch.key}-seed{seed}"),
    }
    return resolve_config(RECIPE, overrides)


# -- data for the sweep and the ERF ---------------------------------------------------------------------
def sweep_data(s: StudySettings) -> LabelledImages:
    """The held-out images every model is tested on: the validation split of the built-in sets, ``<data-dir>/val``
    of a folder tree, or a torchvision set's test split; at most ``val_images`` of them, evenly spaced."""
    return open_dataset(s.dataset, "val", s.data_dir).subsample(s.val_images)


# -- the study ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def captured(log: Any) -> Iterator[None]:
    """The trainer's and the sweep's own output goes to the study's log file, not over the progress bar."""
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield


def _check_previous(run_dir: Path, config: TrainConfig, overwrite: bool) -> bool:
    """True when ``run_dir`` holds a run of exactly this config to reuse (or resume); StudyError when it holds
    another one and ``overwrite`` is off."""
    last = run_dir / "last.pth"
    if overwrite or not last.is_file():
        return False
    try:
        saved = torch.load(last, map_location="cpu", weights_only=True)["config"]
    except Exception:
        raise StudyError(f"{last} cannot be read: delete it or pass --overwrite") from None
    cfg = config.to_dict()
    ignore = ("output", "device", "workers", "progress")
    diff = [k for k in cfg if k not in ignore and saved.get(k) != cfg[k]]
    if diff:
        raise StudyError(
            f"{run_dir} holds a run with other settings ({diff[0]} {saved.get(diff[0])!r}, not {cfg[diff[0]]!r}): "
            "use another --output, or --overwrite to train again"
        )
    return True


def train_run(
    cfg: TrainConfig, reuse: bool, on_epoch: Callable[[dict[str, float]], None]
) -> tuple[nn.Module, dict[str, Any], LoadedModel]:
    """Train one run with ``seqvision train``'s trainer, or with ``reuse`` continue the one in its output
    folder (a finished run trains no further); returns its final model in eval mode, the trainer's summary
    and the model as a ``LoadedModel`` with the run's preprocessing."""
    resume = cfg.output if reuse else None
    trainer = Trainer(cfg, "study", resume=resume, overwrite=True, on_epoch=on_epoch)
    try:
        summary = trainer.fit()
        model = trainer.core.eval()
        loaded = LoadedModel(model, cfg.model, list(trainer.class_names), dict(trainer.data_config))
        summary["device"] = str(trainer.device)
    finally:
        trainer.close()
    return model, summary, loaded


def erf_of(
    loaded: LoadedModel, data: LabelledImages, images: int, device: torch.device
) -> tuple[dict[str, np.ndarray], dict]:
    """Raw ERF maps of every stage of ``loaded`` over ``images`` evenly spaced images at its training size."""
    loader = eval_loader(data.subsample(images), eval_transform(loaded.data_config), batch_size=32)
    batches = (x for x, _y, _p in loader if x is not None)
    return effective_receptive_field(loaded.model, batches, default_layers(loaded.model), device=device)


def threads_per_job(s: StudySettings, runs: int) -> int:
    """Torch threads in each worker: ``s.threads``, else the process's threads shared out over the jobs."""
    return s.threads or max(1, torch.get_num_threads() // min(s.jobs, runs))


def one_run(
    arch: Architecture,
    seed: int,
    s: StudySettings,
    data: LabelledImages,
    sizes: Sequence[int],
    out: Path,
    bar: Progress,
    log: Any,
    tag: str,
    reuse: bool = False,
) -> dict[str, Any]:
    """Train one architecture with one seed, sweep its test size and take its ERF: the run's record, with its
    sweep rows (``rows``), ERF statistics (``erf_rows``) and ERF maps scaled for plotting (``erf_maps``)."""
    epochs_seen = []

    def on_epoch(m: dict[str, float]) -> None:
        epochs_seen.append(m["epoch"])
        bar.step(f"{tag}: epoch {int(m['epoch'])} top-1 {m['top1']:.1f}")

    cfg = run_config(arch, seed, s, out)
    with captured(log):
        model, summary, loaded = train_run(cfg, reuse, on_epoch)
    bar.step(f"{tag}: trained", s.epochs - len(epochs_seen))  # a reused run trains no epoch (or fewer)
    device = torch.device(summary["device"])

    t0 = time.perf_counter()
    rows = []
    for size in sizes:
        with captured(log):
            r, _ = resolution_sweep(loaded, data, [size], device, train_size=s.img_size, batch_size=100)
        for row in r:
            rows.append({"arch": arch.key, "seed": seed, "params": summary["parameters"], **row})
        bar.step(f"{tag}: {size} px top-1 {r[0]['top1']:.1f}")
    t_sweep = time.perf_counter() - t0

    t0 = time.perf_counter()
    with captured(log):
        raw, info = erf_of(loaded, data, s.erf_images, device)
    scaled = shared_minmax(log_maps(raw))
    prefix = int(getattr(loaded.model, "num_prefix_tokens", 0) or 0)
    erf_rows = [
        dict(
            arch=arch.key,
            seed=seed,
            layer=layer,
            feature_shape="x".join(map(str, info[layer]["feature_shape"])),
            area_1pct=erf_stats(raw[layer], scaled[layer])["area_1pct"],
            cross_share=cross_share(raw[layer], *centre_patch(info[layer], s.img_size, prefix)),
        )
        for layer in raw
    ]
    bar.step(f"{tag}: ERF")
    t_erf = time.perf_counter() - t0
    del model

    at_train = next(r["top1"] for r in rows if r["size"] == s.img_size)
    bar.note(
        f"{tag}: {summary['parameters']:,} parameters, top-1 {at_train:.2f}% at {s.img_size} px "
        f"({'reused, ' if reuse else ''}{summary['train_seconds']:.0f} s training, {t_sweep:.0f} s sweep, "
        f"{t_erf:.0f} s ERF)"
    )
    return dict(
        arch=arch.key,
        seed=seed,
        params=summary["parameters"],
        final_top1=summary["final_top1"],
        top1_at_train_size=at_train,
        train_seconds=summary["train_seconds"],
        reused=reuse,
        sweep_seconds=t_sweep,
        erf_seconds=t_erf,
        run=str(Path(cfg.output).relative_to(out)),  # inside the output folder: the record moves with it
        rows=rows,
        erf_rows=erf_rows,
        erf_maps=scaled,
    )


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def cpu_name() -> str:
    """The CPU's model name (for the record of timings)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_study(s: StudySettings, progress: bool | None = None) -> dict[str, Any]:
    """Train every architecture for every seed, sweep the test size, take the ERFs and write all artefacts
    to ``s.output``; returns what ``study.json`` holds. With ``s.jobs`` above 1 the runs are shared out to
    that many worker processes (each with ``s.threads``, else an equal share of torch's threads)."""

    s = check_settings(s)
    threads = torch.get_num_threads()
    if s.threads:
        torch.set_num_threads(s.threads)
    try:
        return _run_study(s, progress)
    finally:
        torch.set_num_threads(threads)


def _worker_run(arch_key: str, seed: int, s: StudySettings, sizes: list[int], tag: str, reuse: bool) -> dict[str, Any]:
    """``one_run`` in a worker process (``study_runner.run_in_workers``)."""
    out = Path(s.output)
    with open(out / "study.log", "a") as log:
        return one_run(ARCHITECTURES[arch_key], seed, s, sweep_data(s), sizes, out, worker_progress(), log, tag, reuse)


def _run_study(s: StudySettings, progress: bool | None) -> dict[str, Any]:
    t_start, cpu_start = time.perf_counter(), time.process_time()
    out = Path(s.output)
    archs = [ARCHITECTURES[k] for k in s.models]
    runs = [(a, seed) for seed in range(s.seeds) for a in archs]  # seed by seed: every architecture early
    # Runs already in the output folder are checked before anything is trained: a clash stops the study now.
    reuse = {
        (a.key, seed): _check_previous(out / "runs" / f"{a.key}-seed{seed}", run_config(a, seed, s, out), s.overwrite)
        for a, seed in runs
    }
    out.mkdir(parents=True, exist_ok=True)
    sizes = study_sizes(s)
    data = sweep_data(s)
    bar = Progress(len(runs) * (s.epochs + len(sizes) + 1), progress)
    bar.note(
        f"seqvision study resolution: {len(archs)} architectures x {_n(s.seeds, 'seed')}, {_n(s.epochs, 'epoch')} at "
        f"{s.img_size} px on {data.source if s.dataset != 'folder' else s.data_dir}; tested at {sizes} px "
        f"on {len(data)} images; log: {out / 'study.log'}"
    )
    tags = [f"[{k}/{len(runs)}] {a.key} seed {seed}" for k, (a, seed) in enumerate(runs, 1)]
    workers_cpu = 0.0
    try:
        if s.jobs > 1:
            calls = [
                (a.key, seed, s, sizes, tag, reuse[(a.key, seed)]) for (a, seed), tag in zip(runs, tags, strict=True)
            ]
            records, workers_cpu = run_in_workers(_worker_run, calls, s.jobs, threads_per_job(s, len(runs)), bar)
        else:
            with open(out / "study.log", "a") as log:
                records = [
                    one_run(a, seed, s, data, sizes, out, bar, log, tag, reuse[(a.key, seed)])
                    for (a, seed), tag in zip(runs, tags, strict=True)
                ]
    finally:
        bar.close()
    rows: list[dict[str, Any]] = []
    runs_done: list[dict[str, Any]] = []
    erf_rows: list[dict[str, Any]] = []
    panels: list[Path] = []
    for (arch, seed), done in zip(runs, records, strict=True):
        rows += done.pop("rows")
        erf_rows += done.pop("erf_rows")
        erf_maps = done.pop("erf_maps")
        if seed == 0:
            title = f"{arch.label}: ERF per stage at {s.img_size} px (seed 0, {s.erf_images} images)"
            panels.append(plot_erf_panel(erf_maps, out / f"erf_{arch.key}.png", title))
        runs_done.append(done)

    summary_rows = summarise(rows, s.img_size)
    params = {a.key: next(t["params"] for t in runs_done if t["arch"] == a.key) for a in archs}
    ref = params[archs[0].key]
    wall = time.perf_counter() - t_start
    result = dict(
        settings=asdict(s),
        sizes=sizes,
        data=dict(source=data.source, test_images=len(data), classes=len(data.class_names)),
        architectures={
            a.key: dict(
                label=a.label,
                model=a.model,
                kwargs=a.kwargs,
                params=params[a.key],
                params_vs_first=params[a.key] / ref,
            )
            for a in archs
        },
        recipe=RECIPE,
        runs=runs_done,
        summary=summary_rows,
        erf=erf_rows,
        rows=rows,
        timings=dict(
            wall_seconds=wall,
            # CPU time of this process and its workers: on a shared machine, wall time overstates the work
            process_cpu_seconds=time.process_time() - cpu_start + workers_cpu,
            reused_runs=sum(r["reused"] for r in runs_done),  # their train_seconds are from when they ran
            **{f"{k}_seconds": sum(r[f"{k}_seconds"] for r in runs_done) for k in ("train", "sweep", "erf")},
            cpu=cpu_name(),
            torch_threads=threads_per_job(s, len(runs)) if s.jobs > 1 else torch.get_num_threads(),
            jobs=s.jobs,
            torch=torch.__version__,
            python=platform.python_version(),
        ),
    )
    write_json(out / "study.json", result)
    write_csv(out / "resolution.csv", rows)
    write_csv(out / "summary.csv", summary_rows)
    write_csv(out / "erf.csv", erf_rows)
    title = (
        f"{data.source.split(' (')[0]}: trained at {s.img_size} px, {_n(s.epochs, 'epoch')}, "
        f"{_n(s.seeds, 'seed')} (line: mean, band: min-max)"
    )
    labels = {a.key: a.label for a in archs}
    plot_resolution(summary_rows, out / "resolution.png", s.img_size, title, labels)
    result["files"] = [
        str(out / n) for n in ("study.json", "resolution.csv", "summary.csv", "erf.csv", "resolution.png")
    ] + [str(p) for p in panels]
    return result
