"""val_fraction: stratified, seeded, disjoint carve-out of the training split; build_dataset checks."""

from __future__ import annotations

import pytest
from data_helpers import make_cub, make_folder

from dual_cross_attention.data import build_dataset, build_splits, stratified_split

COUNTS = {"train": {"a": 10, "b": 5, "c": 1}, "test": {"a": 2}}


def test_stratified_split_counts_per_class():
    targets = [0] * 10 + [1] * 5 + [2] * 1
    train, val = stratified_split(targets, 0.2, seed=0)
    # round(0.2 * 10) = 2, max(1, round(0.2 * 5)) = 1, a single image stays in train
    assert sorted(targets[i] for i in val) == [0, 0, 1]
    assert sorted(train + val) == list(range(16))
    assert not set(train) & set(val)


def test_stratified_split_is_seeded():
    targets = [0] * 10 + [1] * 10
    assert stratified_split(targets, 0.3, seed=5) == stratified_split(targets, 0.3, seed=5)
    assert stratified_split(targets, 0.3, seed=5)[1] != stratified_split(targets, 0.3, seed=6)[1]


def test_every_class_keeps_a_training_image():
    _, val = stratified_split([0, 0, 1, 1], 0.9, seed=0)
    assert sorted(val) in ([0, 2], [0, 3], [1, 2], [1, 3])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_fraction_must_be_inside_zero_one(fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split([0, 1], fraction, seed=0)


def test_build_dataset_val_fraction(tmp_path):
    make_folder(tmp_path, COUNTS)
    full = build_dataset("folder", tmp_path, "train")
    train = build_dataset("folder", tmp_path, "train", val_fraction=0.2, val_seed=1)
    val = build_dataset("folder", tmp_path, "val", val_fraction=0.2, val_seed=1, transform=lambda x: x.shape)
    test = build_dataset("folder", tmp_path, "test", val_fraction=0.2, val_seed=1)
    assert sorted(val.targets) == [0, 0, 1]
    assert len(train) == 13
    assert set(train.samples) | set(val.samples) == set(full.samples)
    assert not set(train.samples) & set(val.samples)
    assert val.classes == full.classes
    assert val[0][0] == (16, 20, 3)  # its own transform
    assert len(test) == 2
    again = build_dataset("folder", tmp_path, "val", val_fraction=0.2, val_seed=1)
    assert again.samples == val.samples


def test_val_fraction_rejects_other_splits(tmp_path):
    make_cub(tmp_path)
    with pytest.raises(ValueError, match="'train', 'val' and 'test'"):
        build_dataset("cub", tmp_path, "trainval", val_fraction=0.5)


def test_unknown_dataset_and_missing_root():
    with pytest.raises(ValueError, match="valid names"):
        build_dataset("imagenet", "/tmp", "train")
    with pytest.raises(ValueError, match="needs a root"):
        build_dataset("cub", None, "train")


@pytest.mark.parametrize("fraction", [1.0, -0.2])
def test_build_functions_reject_bad_fractions(tmp_path, fraction):
    make_folder(tmp_path, COUNTS)
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        build_splits("folder", tmp_path, None, None, val_fraction=fraction)
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        build_dataset("folder", tmp_path, "test", val_fraction=fraction)
