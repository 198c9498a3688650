"""Stanford Cars in its three layouts (devkit .mat, merged cars_annos.mat, Kaggle CSV)."""

from __future__ import annotations

import pytest
from data_helpers import CARS_CLASSES, make_cars_csv, make_cars_devkit, make_cars_merged, write_lines

from dual_cross_attention.data import DatasetLayoutError, build_dataset
from dual_cross_attention.data.cars import detect_layout


@pytest.mark.parametrize("test_labels_in", ["root", "devkit"])
@pytest.mark.parametrize("nested", [False, True])
def test_devkit_layout(tmp_path, test_labels_in, nested):
    make_cars_devkit(tmp_path, test_labels_in=test_labels_in, nested=nested)
    assert detect_layout(tmp_path) == "devkit"
    train = build_dataset("cars", tmp_path, "train")
    test = build_dataset("cars", tmp_path, "test")
    assert train.classes == CARS_CLASSES
    assert train.classes[1] == "Ram C/V Cargo Van Minivan 2012"
    assert train.targets == [1, 0, 2]
    assert test.targets == [2, 1]
    assert [p.name for p in train.samples] == ["00001.jpg", "00002.jpg", "00003.jpg"]
    assert all(p.parent.name == "cars_test" for p in test.samples)
    assert train[0][0].shape == (16, 20, 3)


def test_devkit_without_test_labels_explains(tmp_path):
    make_cars_devkit(tmp_path)
    (tmp_path / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(DatasetLayoutError, match="cars_test_annos_withlabels.mat") as err:
        build_dataset("cars", tmp_path, "test")
    assert str(tmp_path / "devkit" / "cars_test_annos_withlabels.mat") in str(err.value)
    assert len(build_dataset("cars", tmp_path, "train")) == 3


def test_devkit_missing_meta_is_named(tmp_path):
    make_cars_devkit(tmp_path)
    (tmp_path / "devkit" / "cars_meta.mat").unlink()
    with pytest.raises(DatasetLayoutError) as err:
        build_dataset("cars", tmp_path, "train")
    assert str(tmp_path / "devkit" / "cars_meta.mat") in str(err.value)
    assert "devkit layout" in str(err.value)


def test_merged_layout(tmp_path):
    make_cars_merged(tmp_path)
    assert detect_layout(tmp_path) == "merged"
    train = build_dataset("cars", tmp_path, "train")
    test = build_dataset("cars", tmp_path, "test")
    assert train.classes == CARS_CLASSES
    assert train.targets == [0, 2]
    assert test.targets == [1]
    assert [p.name for p in train.samples] == ["000001.jpg", "000003.jpg"]
    assert test.samples == [tmp_path / "car_ims" / "000002.jpg"]


@pytest.mark.parametrize("class_folders", [True, False])
def test_csv_layout(tmp_path, class_folders):
    make_cars_csv(tmp_path, class_folders=class_folders)
    assert detect_layout(tmp_path) == "csv"
    train = build_dataset("cars", tmp_path, "train")
    test = build_dataset("cars", tmp_path, "test")
    assert train.classes == CARS_CLASSES
    assert train.targets == [1, 0, 2]
    assert test.targets == [2, 1]
    if class_folders:
        # the image of class 'Ram C/V ...' sits in a folder spelled with '-'
        assert train.samples[0].parent.name == "Ram C-V Cargo Van Minivan 2012"
        assert test.samples[0].parent.parent.name == "test"
    else:
        assert train.samples[0] == tmp_path / "train" / "00001.jpg"


def test_csv_missing_image_names_csv_and_image(tmp_path):
    make_cars_csv(tmp_path, class_folders=False)
    (tmp_path / "train" / "00003.jpg").unlink()
    with pytest.raises(DatasetLayoutError) as err:
        build_dataset("cars", tmp_path, "train")
    assert str(tmp_path / "anno_train.csv") in str(err.value)
    assert str(tmp_path / "train" / "00003.jpg") in str(err.value)


def test_csv_class_id_out_of_range(tmp_path):
    make_cars_csv(tmp_path, class_folders=False)
    write_lines(tmp_path / "anno_train.csv", ["00001.jpg,1,2,15,12,4"])
    with pytest.raises(DatasetLayoutError, match=r"class ids \[4\] outside 1\.\.3"):
        build_dataset("cars", tmp_path, "train")


def test_no_layout_lists_all_three(tmp_path):
    (tmp_path / "something").mkdir()
    with pytest.raises(DatasetLayoutError) as err:
        build_dataset("cars", tmp_path, "train")
    message = str(err.value)
    assert str(tmp_path) in message
    assert "cars_annos.mat" in message and "anno_train.csv" in message and "cars_meta.mat" in message


def test_several_layouts_need_explicit_choice(tmp_path):
    make_cars_devkit(tmp_path)
    make_cars_merged(tmp_path)
    with pytest.raises(DatasetLayoutError, match="layout='devkit'"):
        build_dataset("cars", tmp_path, "train")
    assert build_dataset("cars", tmp_path, "train", layout="merged").targets == [0, 2]
    assert build_dataset("cars", tmp_path, "train", layout="devkit").targets == [1, 0, 2]


def test_unknown_option_lists_valid_ones(tmp_path):
    make_cars_merged(tmp_path)
    with pytest.raises(ValueError, match=r"\['layout'\]"):
        build_dataset("cars", tmp_path, "train", level="variant")


def test_unparsable_csv_is_named(tmp_path):
    make_cars_csv(tmp_path, class_folders=False)
    (tmp_path / "anno_test.csv").write_text("")
    with pytest.raises(DatasetLayoutError, match="cannot parse") as err:
        build_dataset("cars", tmp_path, "test")
    assert str(tmp_path / "anno_test.csv") in str(err.value)
    write_lines(tmp_path / "anno_test.csv", ["00001.jpg,1,2,15,12,three"])
    with pytest.raises(DatasetLayoutError, match="class ids must be integers"):
        build_dataset("cars", tmp_path, "test")
