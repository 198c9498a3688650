"""FGVC-Aircraft: root forms, levels, splits, first-space label split, banner crop."""

from __future__ import annotations

import numpy as np
import pytest
from data_helpers import AIRCRAFT_FAMILIES, AIRCRAFT_MANUFACTURERS, AIRCRAFT_VARIANTS, make_aircraft

from dual_cross_attention.data import (
    DataError,
    DatasetLayoutError,
    build_dataset,
    build_splits,
    default_train_split,
)


@pytest.mark.parametrize("point_at", ["parent", "fgvc", "data"])
def test_root_forms_and_variant_labels(tmp_path, point_at):
    fgvc = make_aircraft(tmp_path)
    root = {"parent": tmp_path, "fgvc": fgvc, "data": fgvc / "data"}[point_at]
    test = build_dataset("aircraft", root, "test")
    assert test.classes == AIRCRAFT_VARIANTS
    assert test.classes[2] == "Cessna 172" and test.classes[3] == "F/A-18"  # space and '/' kept
    assert [p.stem for p in test.samples] == ["1025794", "1340192", "0056978"]
    assert test.targets == [3, 2, 0]


def test_split_sizes(tmp_path):
    make_aircraft(tmp_path)
    sizes = {
        split: len(build_dataset("aircraft", tmp_path, split))
        for split in ("train", "val", "trainval", "test")
    }
    assert sizes == {"train": 3, "val": 3, "trainval": 6, "test": 3}
    assert default_train_split("aircraft") == "trainval"


@pytest.mark.parametrize(
    ("level", "names"),
    [("variant", AIRCRAFT_VARIANTS), ("family", AIRCRAFT_FAMILIES), ("manufacturer", AIRCRAFT_MANUFACTURERS)],
)
def test_levels(tmp_path, level, names):
    make_aircraft(tmp_path)
    val = build_dataset("aircraft", tmp_path, "val", level=level)
    assert val.classes == names
    assert val.targets == [2, 3, 2]


def test_banner_is_cropped_by_default(tmp_path):
    make_aircraft(tmp_path, height=50, width=40)
    cropped = build_dataset("aircraft", tmp_path, "train")[0][0]
    full = build_dataset("aircraft", tmp_path, "train", crop_banner=False)[0][0]
    assert full.shape == (50, 40, 3)
    assert cropped.shape == (30, 40, 3)
    np.testing.assert_array_equal(cropped, full[:30])
    # the white banner rows are gone: every remaining pixel is the blue body (JPEG noise aside)
    assert cropped[..., 0].max() < 100 and full[-1, :, 0].min() > 200


def test_label_with_unknown_class_is_named(tmp_path):
    data = make_aircraft(tmp_path) / "data"
    (data / "images_variant_test.txt").write_text("1025794 747-400\n")
    with pytest.raises(DatasetLayoutError, match="'747-400'") as err:
        build_dataset("aircraft", tmp_path, "test")
    assert str(data / "images_variant_test.txt") in str(err.value)


def test_missing_split_file_and_image(tmp_path):
    data = make_aircraft(tmp_path) / "data"
    (data / "images_family_val.txt").unlink()
    with pytest.raises(DatasetLayoutError) as err:
        build_dataset("aircraft", tmp_path, "val", level="family")
    assert str(data / "images_family_val.txt") in str(err.value)
    (data / "images" / "0034958.jpg").unlink()
    with pytest.raises(DatasetLayoutError) as err:
        build_dataset("aircraft", tmp_path, "train")
    assert str(data / "images" / "0034958.jpg") in str(err.value)
    assert str(data / "images_variant_train.txt") in str(err.value)


def test_wrong_root_lists_candidates(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(DatasetLayoutError) as err:
        build_dataset("aircraft", tmp_path / "x", "train")
    assert str(tmp_path / "x" / "fgvc-aircraft-2013b" / "data") in str(err.value)
    assert "images_<level>_<split>.txt" in str(err.value)


def test_bad_level_and_split(tmp_path):
    make_aircraft(tmp_path)
    with pytest.raises(ValueError, match="level"):
        build_dataset("aircraft", tmp_path, "train", level="model")
    with pytest.raises(ValueError, match="splits"):
        build_dataset("aircraft", tmp_path, "everything")


def test_build_splits_trains_on_trainval(tmp_path):
    make_aircraft(tmp_path)
    splits = build_splits("aircraft", tmp_path, None, None)
    assert len(splits.train) == 6 and splits.val is None and len(splits.test) == 3
    carved = build_splits("aircraft", tmp_path, None, None, val_fraction=0.5, val_seed=0)
    # trainval holds two images each of classes 0 and 2 and one each of classes 1 and 3: one of
    # each pair goes to val, the single images stay in train
    assert sorted(carved.val.targets) == [0, 2]
    assert sorted(carved.train.targets) == [0, 1, 2, 3]
    assert not set(carved.val.samples) & set(carved.train.samples)


def test_image_too_small_for_the_banner_names_the_file(tmp_path):
    make_aircraft(tmp_path, height=20, width=40)
    dataset = build_dataset("aircraft", tmp_path, "train")
    with pytest.raises(DataError, match=str(dataset.samples[0])):
        dataset[0]
