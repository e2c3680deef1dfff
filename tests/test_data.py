"""The data layer: the digits split, ImageFolder checks, torchvision sets, reproducible augmentation and sharding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.data import create_transform
from train_helpers import make_stanford_cars, make_tree

from seqvision.data import (
    ImageDataset,
    PaddedShard,
    SeededDataset,
    ShardedEpochSampler,
    collate,
    digits_images,
    digits_split,
    image_folder,
    open_dataset,
    open_train_val,
)
from seqvision.errors import DataError, UserError


def test_digits_split_is_fixed_stratified_and_disjoint():
    x_tr, y_tr = digits_split("train")
    x_va, y_va = digits_split("val")
    assert len(x_tr) + len(x_va) == 1797 and len(x_va) == 360
    assert x_tr.shape[1:] == (8, 8) and x_tr.max() <= 16
    assert np.array_equal(digits_split("val")[1], y_va)  # the same split every time
    # stratified: every digit is 10 % (+- one image) of the validation split
    assert np.all(np.abs(np.bincount(y_va, minlength=10) - 36) <= 1)
    train_rows = {a.tobytes() for a in x_tr}
    assert sum(a.tobytes() in train_rows for a in x_va) < 5  # (a few digits are exact duplicates in the data)


def test_digits_split_matches_what_validate_uses():
    data = open_dataset("digits", "val")
    assert [t for _, t in data.samples] == digits_split("val")[1].tolist()


def test_digits_images_upsampled_for_training():
    img, target = digits_images("train", 32)[0]
    assert img.size == (32, 32) and img.mode == "L" and 0 <= target <= 9
    assert digits_images("val")[0][0].size == (8, 8)


def test_missing_folder_names_it(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        open_train_val("folder", tmp_path / "nope")
    (tmp_path / "data" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="val"):
        open_train_val("folder", tmp_path / "data")


def test_empty_class_names_the_folder(tmp_path):
    make_tree(tmp_path / "train", {"cat": 2, "dog": 0})
    with pytest.raises(DataError) as e:
        image_folder(tmp_path / "train")
    assert str(tmp_path / "train" / "dog") in str(e.value) and "no images" in str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_folder_without_classes(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class sub-directories"):
        image_folder(tmp_path / "train")


def test_corrupt_image_becomes_a_problem_naming_the_file(tmp_path):
    make_tree(tmp_path, {"a": 2, "b": 2})
    bad = tmp_path / "b" / "1.png"
    bad.write_bytes(b"not a png at all")
    ds = ImageDataset(image_folder(tmp_path).samples, create_transform(16))
    results = [ds[i] for i in range(len(ds))]
    problems = [p for _, _, p in results if p]
    assert len(problems) == 1 and str(bad) in problems[0]
    x, y, probs = collate(results)  # the readable images stay; the problem comes alongside
    assert x.shape == (3, 3, 16, 16) and y.tolist() == [0, 0, 1] and probs == problems
    x, y, probs = collate([r for r in results if r[2]])
    assert x is None and len(y) == 0 and probs == problems


def test_torchvision_set_not_on_disk(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        open_dataset("cifar10", "train", tmp_path)
    with pytest.raises(DataError, match="needs a data folder"):
        open_dataset("flowers102", "val")
    with pytest.raises(DataError, match="unknown data set 'imagenet21k'"):
        open_dataset("imagenet21k")


def test_seeded_augmentation_depends_only_on_seed_epoch_index():
    tf = create_transform(32, is_training=True, scale=(0.3, 1.0), auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5)
    ds = SeededDataset(ImageDataset(digits_images("train", 32)[:8], tf), seed=3)
    a = [ds[i][0] for i in (0, 1, 2)]
    torch.rand(5)  # global RNG activity in between must not matter
    b = [ds[i][0] for i in (2, 1, 0)][::-1]  # nor the order of access
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0], a[0])
    state = torch.get_rng_state()
    ds[0]
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left as it was


def test_sampler_order_shards_and_skip():
    s = ShardedEpochSampler(10, shuffle=True, seed=0)
    s.set_epoch(0)
    first = list(s)
    assert sorted(first) == list(range(10))
    s.set_epoch(0, start=4)
    assert list(s) == first[4:] and len(s) == 6
    s.set_epoch(1)
    assert list(s) != first
    shards = [ShardedEpochSampler(10, True, 0, rank=r, world_size=2) for r in (0, 1)]
    for sh in shards:
        sh.set_epoch(0)
    assert sorted(list(shards[0]) + list(shards[1])) == list(range(10))
    # validation shards: every index once, the same length on every rank, padding marked with target -1
    base = [(torch.tensor(i), i, "") for i in range(7)]
    a, b = PaddedShard(base, 0, 2), PaddedShard(base, 1, 2)
    assert len(a) == len(b) == 4
    real = [a[i][1] for i in range(4)] + [b[i][1] for i in range(4)]
    assert sorted(t for t in real if t >= 0) == list(range(7)) and real.count(-1) == 1


def test_open_dataset_names_and_paths(tmp_path):
    make_tree(tmp_path / "d" / "train", {"a": 2, "b": 3})
    make_tree(tmp_path / "d" / "val", {"a": 1, "b": 1})
    by_name = open_dataset("folder", "train", tmp_path / "d")
    by_path = open_dataset(str(tmp_path / "d"), "train")
    assert by_name.class_names == by_path.class_names == ["a", "b"] and len(by_name) == len(by_path) == 5
    whole = open_dataset("folder", None, tmp_path / "d" / "val")
    assert len(whole) == 2 and whole.subsample(1).samples == [whole.samples[0]]
    train, val = open_train_val("folder", tmp_path / "d")
    assert (len(train), len(val)) == (5, 2)
    make_tree(tmp_path / "e" / "train", {"a": 2, "b": 2})
    make_tree(tmp_path / "e" / "val", {"a": 1, "c": 1})
    with pytest.raises(DataError, match="different classes"):
        open_train_val("folder", tmp_path / "e")


def test_torchvision_layout_is_read_without_download(tmp_path):
    """A small tree in torchvision's StanfordCars layout (its .mat files written here) opens as a data set."""
    names = make_stanford_cars(tmp_path, n_train=4, n_test=2)
    train, val = open_train_val("stanford_cars", tmp_path)
    assert (len(train), len(val)) == (4, 2) and train.class_names == names
    img, target = val.samples[1]
    assert img.size == (12, 10) and target == 1
    assert max(abs(a - b) for a, b in zip(img.getpixel((0, 0)), (200, 20, 20), strict=True)) <= 3  # JPEG
