"""Helpers for the training tests: a tiny model and tiny image trees, so that runs take seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# A 16 px Sequencer2D with ~15k parameters: it still learns digits well above chance in two epochs.
TINY: dict[str, Any] = {
    "model_kwargs": {
        "layers": [1, 1, 1, 1],
        "patch_sizes": [2, 2, 1, 1],
        "embed_dims": [16, 32, 32, 32],
        "hidden_sizes": [4, 8, 8, 8],
    },
    "img_size": 16,
    "batch_size": 32,
    "lr": 5e-3,
    "lr_base_batch": 32,
    "epochs": 2,
    "warmup_epochs": 0,
    "tensorboard": False,
    "progress": False,
    "log_every_steps": 0,
}


def tiny_set_args(exclude: tuple[str, ...] = (), **extra: Any) -> list[str]:
    """TINY (and ``extra``, less ``exclude``) as ``--set KEY=VALUE`` command-line arguments."""
    import yaml

    args = []
    for k, v in {**TINY, **extra}.items():
        if k in exclude:
            continue
        args += ["--set", f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"]
    return args


def make_tree(root: Path, classes: dict[str, int], size: int = 12, seed: int = 0) -> Path:
    """An ImageFolder tree ``root/<class>/<i>.png`` with ``classes[name]`` images per class; each class has its
    own colour, so a model can tell them apart."""
    rng = np.random.default_rng(seed)
    for c, (name, n) in enumerate(classes.items()):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            base = np.zeros((size, size, 3), np.uint8)
            base[..., c % 3] = 200
            noise = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
            Image.fromarray(base + noise).save(d / f"{i}.png")
    return root


def make_stanford_cars(root: Path, n_train: int, n_test: int, size: tuple[int, int] = (12, 10)) -> list[str]:
    """A tree in torchvision's StanfordCars layout under ``root/stanford_cars`` (images and the .mat files);
    two classes, told apart by colour (class 1 red, class 0 blue). Returns the class names."""
    from scipy.io import savemat

    base = root / "stanford_cars"
    names = ["AM General Hummer", "Acura RL"]
    rng = np.random.default_rng(0)
    fields = [(f, "O") for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    for split, folder, n in (("train", "cars_train", n_train), ("test", "cars_test", n_test)):
        (base / folder).mkdir(parents=True)
        annos = []
        for i in range(n):
            fname = f"{split}{i:03d}.jpg"
            colour = np.array((200, 20, 20) if i % 2 else (20, 20, 200), np.uint8)
            noise = rng.integers(0, 3, (size[1], size[0], 3), dtype=np.uint8) if i >= 2 else 0
            Image.fromarray(np.broadcast_to(colour, (size[1], size[0], 3)) + noise).save(base / folder / fname)
            annos.append((1, 1, size[0] - 2, size[1] - 2, i % 2 + 1, fname))
        mat = base / ("devkit/cars_train_annos.mat" if split == "train" else "cars_test_annos_withlabels.mat")
        mat.parent.mkdir(exist_ok=True)
        savemat(mat, {"annotations": np.array(annos, dtype=fields)})
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(names, dtype=object)})
    return names


def subprocess_env(threads: int = 1) -> dict[str, str]:
    """Environment for a child training process: one thread each (the machine is small and shared)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def run_train(args: list[str], timeout: float = 300, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "seqvision.train", *args],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )
