"""CUB-200-2011 loader: ids 1-based in the files, labels 0-based, official split, errors."""

from __future__ import annotations

import numpy as np
import pytest
from data_helpers import make_cub

from dual_cross_attention.data import DatasetLayoutError, build_dataset


@pytest.mark.parametrize("point_at", ["parent", "cub_dir"])
def test_cub_counts_labels_and_root_forms(tmp_path, point_at):
    cub = make_cub(tmp_path)
    root = tmp_path if point_at == "parent" else cub
    train = build_dataset("cub", root, "train")
    test = build_dataset("cub", root, "test")
    assert train.classes == ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    assert train.targets == [0, 1, 2, 2]
    assert test.targets == [0, 1]
    assert [p.name for p in train.samples] == ["img_1.jpg", "img_3.jpg", "img_5.jpg", "img_6.jpg"]
    assert [p.name for p in test.samples] == ["img_2.jpg", "img_4.jpg"]
    image, label = train[1]
    assert label == 1
    assert isinstance(image, np.ndarray) and image.shape == (16, 20, 3) and image.dtype == np.uint8


def test_cub_transform_is_applied(tmp_path):
    make_cub(tmp_path)
    dataset = build_dataset("cub", tmp_path, "test", transform=lambda image: image.shape)
    assert dataset[0] == ((16, 20, 3), 0)


def test_missing_root_names_path_and_tree(tmp_path):
    with pytest.raises(DatasetLayoutError) as err:
        build_dataset("cub", tmp_path / "nowhere", "train")
    assert str(tmp_path / "nowhere") in str(err.value)
    assert "image_class_labels.txt" in str(err.value)  # the expected tree is printed


def test_missing_split_file_is_named(tmp_path):
    cub = make_cub(tmp_path)
    (cub / "train_test_split.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="train_test_split.txt") as err:
        build_dataset("cub", cub, "train")
    assert str(cub / "train_test_split.txt") in str(err.value)


def test_root_without_images_txt(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="no images.txt"):
        build_dataset("cub", tmp_path / "empty", "train")


def test_label_file_referencing_missing_image_names_both(tmp_path):
    cub = make_cub(tmp_path)
    missing = cub / "images" / "002.Laysan_Albatross" / "img_3.jpg"
    missing.unlink()
    with pytest.raises(DatasetLayoutError) as err:
        build_dataset("cub", cub, "train")
    assert str(cub / "images.txt") in str(err.value)
    assert str(missing) in str(err.value)
    # the test split does not reference that image, so it still loads
    assert len(build_dataset("cub", cub, "test")) == 2


def test_unknown_class_id_and_bad_split_flag(tmp_path):
    cub = make_cub(tmp_path)
    (cub / "image_class_labels.txt").write_text("1 1\n2 1\n3 2\n4 2\n5 9\n6 3\n")
    with pytest.raises(DatasetLayoutError, match="class id '9'"):
        build_dataset("cub", cub, "train")
    make_cub(tmp_path)
    (cub / "train_test_split.txt").write_text("1 1\n2 0\n3 2\n4 0\n5 1\n6 1\n")
    with pytest.raises(DatasetLayoutError, match="split flag '2'"):
        build_dataset("cub", cub, "train")


def test_malformed_line_names_file_and_line(tmp_path):
    cub = make_cub(tmp_path)
    (cub / "images.txt").write_text("1 001.Black_footed_Albatross/img_1.jpg\n2\n")
    with pytest.raises(DatasetLayoutError, match=r"images\.txt:2"):
        build_dataset("cub", cub, "train")


def test_cub_has_no_val_split_without_val_fraction(tmp_path):
    make_cub(tmp_path)
    with pytest.raises(ValueError, match="splits"):
        build_dataset("cub", tmp_path, "val")
