"""Folder-per-class datasets: sorted classes shared by all splits, val/, errors."""

from __future__ import annotations

import pytest
from data_helpers import make_folder, write_jpeg

from dual_cross_attention.data import DatasetLayoutError, build_dataset, build_splits

COUNTS = {"train": {"b_wren": 2, "a_finch": 1, "c_tit": 3}, "test": {"c_tit": 1, "a_finch": 2}}


def test_classes_sorted_and_shared_across_splits(tmp_path):
    make_folder(tmp_path, COUNTS)
    (tmp_path / "train" / "b_wren" / "notes.txt").write_text("not an image")
    train = build_dataset("folder", tmp_path, "train")
    test = build_dataset("folder", tmp_path, "test")
    assert train.classes == test.classes == ["a_finch", "b_wren", "c_tit"]
    assert train.targets == [0, 1, 1, 2, 2, 2]
    assert test.targets == [0, 0, 2]
    assert [p.parent.name for p in test.samples] == ["a_finch", "a_finch", "c_tit"]


def test_val_folder_is_used_as_val_split(tmp_path):
    make_folder(tmp_path, {**COUNTS, "val": {"b_wren": 1}})
    splits = build_splits("folder", tmp_path, None, None)
    assert splits.val is not None and splits.val.targets == [1]
    with pytest.raises(ValueError, match="own 'val' split"):
        build_splits("folder", tmp_path, None, None, val_fraction=0.5)


def test_no_val_folder_means_no_val_split(tmp_path):
    make_folder(tmp_path, COUNTS)
    assert build_splits("folder", tmp_path, None, None).val is None
    with pytest.raises(DatasetLayoutError) as err:
        build_dataset("folder", tmp_path, "val")
    assert str(tmp_path / "val") in str(err.value)


def test_test_class_missing_from_train_is_an_error(tmp_path):
    make_folder(tmp_path, COUNTS)
    write_jpeg(tmp_path / "test" / "d_jay" / "0.jpg")
    with pytest.raises(DatasetLayoutError) as err:
        build_dataset("folder", tmp_path, "test")
    assert str(tmp_path / "test" / "d_jay") in str(err.value)


def test_empty_train_class_is_an_error(tmp_path):
    make_folder(tmp_path, COUNTS)
    (tmp_path / "train" / "e_empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="holds no images") as err:
        build_dataset("folder", tmp_path, "train")
    assert str(tmp_path / "train" / "e_empty") in str(err.value)


def test_missing_train_folder(tmp_path):
    (tmp_path / "test" / "a").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError) as err:
        build_dataset("folder", tmp_path, "test")
    assert str(tmp_path / "train") in str(err.value)
    assert "train/<class name>/*.jpg" in str(err.value)
