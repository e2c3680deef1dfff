"""Data for seqvision train: the digits split, ImageFolder checks, reproducible augmentation and sharding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.data import create_transform
from train_helpers import make_tree

from seqvision.data import (
    ItemDataset,
    SeededDataset,
    ShardedEpochSampler,
    build_datasets,
    collate_with_problems,
    digits_images,
    digits_split,
    image_folder_items,
    shard_indices,
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
    from seqvision.evaluate import open_data

    data = open_data("digits", "val")
    assert [t for _, t in data.items] == digits_split("val")[1].tolist()


def test_digits_images_upsampled_for_training():
    img, target = digits_images("train", 32)[0]
    assert img.size == (32, 32) and img.mode == "L" and 0 <= target <= 9
    assert digits_images("val")[0][0].size == (8, 8)


def test_missing_folder_names_it(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        build_datasets("folder", tmp_path / "nope", None, None, 16)
    (tmp_path / "data" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="val"):
        build_datasets("folder", tmp_path / "data", None, None, 16)


def test_empty_class_names_the_folder(tmp_path):
    make_tree(tmp_path / "train", {"cat": 2, "dog": 0})
    with pytest.raises(DataError) as e:
        image_folder_items(tmp_path / "train")
    assert str(tmp_path / "train" / "dog") in str(e.value) and "no images" in str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_folder_without_classes(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class sub-directories"):
        image_folder_items(tmp_path / "train")


def test_corrupt_image_becomes_a_problem_naming_the_file(tmp_path):
    make_tree(tmp_path, {"a": 2, "b": 2})
    bad = tmp_path / "b" / "1.png"
    bad.write_bytes(b"not a png at all")
    items, classes = image_folder_items(tmp_path)
    ds = ItemDataset(items, create_transform(16))
    results = [ds[i] for i in range(len(ds))]
    problems = [p for _, _, p in results if p]
    assert len(problems) == 1 and str(bad) in problems[0]
    x, y, probs = collate_with_problems(results)
    assert x is None and probs == problems
    x, y, probs = collate_with_problems([r for r in results if not r[2]])
    assert x.shape == (3, 3, 16, 16) and probs == []


def test_torchvision_set_not_on_disk(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        build_datasets("cifar10", tmp_path, None, None, 32)
    with pytest.raises(DataError, match="needs --data-dir"):
        build_datasets("flowers102", None, None, None, 32)


def test_seeded_augmentation_depends_only_on_seed_epoch_index():
    tf = create_transform(32, is_training=True, scale=(0.3, 1.0), auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5)
    ds = SeededDataset(ItemDataset(digits_images("train", 32)[:8], tf), seed=3)
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
    assert sorted(shard_indices(7, 0, 2) + shard_indices(7, 1, 2)) == list(range(7))
