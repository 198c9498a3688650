"""Re-ID layouts (Market-1501, DukeMTMC-reID, MSMT17 V1/V2, VeRi-776, reid_folder), dataset, transforms."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from reid_helpers import DUKE, jpeg, make_market, make_market_like, make_msmt, make_reid_folder, make_veri

from dual_cross_attention.data import CorruptImageError, DatasetLayoutError
from dual_cross_attention.data.reid import ReIDDataset, build_reid_datasets, load_reid_splits
from dual_cross_attention.data.reid_transforms import (
    build_reid_eval_transform,
    build_reid_train_transform,
    parse_reid_size,
)
from dual_cross_attention.errors import DcalError, UsageError

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def fields(records, name):
    return [getattr(r, name) for r in records]


def test_market_pids_cameras_relabelling_junk_and_distractors(tmp_path):
    splits = load_reid_splits("market1501", make_market(tmp_path))
    assert fields(splits.train, "pid") == [2, 2, 2, 7, 7, 15, 15]
    assert fields(splits.train, "label") == [0, 0, 0, 1, 1, 2, 2]  # sorted original ids -> 0..C-1
    assert fields(splits.train, "camid") == [0, 1, 5, 0, 2, 4, 5]  # c1..c6 -> 0-based
    assert splits.num_train_ids == 3
    assert fields(splits.query, "pid") == [1, 3] and fields(splits.query, "camid") == [0, 2]
    assert fields(splits.query, "label") == [1, 3]  # query/gallery keep the original pid
    # the two junk (-1) boxes are left out; the distractor (0) stays; Thumbs.db is ignored
    assert fields(splits.gallery, "pid") == [0, 1, 1, 3]
    assert fields(splits.gallery, "camid") == [5, 0, 1, 3]
    assert [r.path.name for r in splits.gallery][0] == "0000_c6s1_000001_01.jpg"
    assert splits.left_out == 2 and splits.version == "" and splits.has_cameras
    assert splits.summary() == (
        "market1501: train 7 images of 3 ids, query 2 images of 2 ids, gallery 4 images of 3 ids, "
        "6 cameras, 2 junk/distractor images left out"
    )


def test_market_junk_and_distractors_never_train_or_query(tmp_path):
    root = make_market(tmp_path)
    jpeg(root / "bounding_box_train" / "0000_c1s1_000001_01.jpg")
    jpeg(root / "bounding_box_train" / "-1_c2s1_000002_01.jpg")
    jpeg(root / "query" / "0000_c3s1_000003_01.jpg")
    splits = load_reid_splits("market1501", root)
    assert fields(splits.train, "pid") == [2, 2, 2, 7, 7, 15, 15]
    assert fields(splits.query, "pid") == [1, 3]
    assert splits.left_out == 5


def test_market_root_may_be_the_parent_folder(tmp_path):
    make_market(tmp_path / "Market-1501-v15.09.15")
    splits = load_reid_splits("market1501", tmp_path)
    assert splits.root == tmp_path / "Market-1501-v15.09.15"
    assert len(splits.train) == 7


def test_market_bad_name_is_named(tmp_path):
    root = make_market(tmp_path)
    jpeg(root / "query" / "person_7.jpg")
    jpeg(root / "query" / "0004_c0s1_000001_00.jpg")  # cameras are numbered from 1
    with pytest.raises(DatasetLayoutError) as err:
        load_reid_splits("market1501", root)
    message = str(err.value)
    assert "person_7.jpg" in message and "0004_c0s1_000001_00.jpg" in message
    assert str(root / "query") in message and "bounding_box_train/" in message  # the tree


def test_market_missing_folder_names_path_and_tree(tmp_path):
    root = make_market(tmp_path)
    shutil.rmtree(root / "bounding_box_test")
    with pytest.raises(DatasetLayoutError) as err:
        load_reid_splits("market1501", root)
    assert str(root / "bounding_box_test") in str(err.value)
    assert "Expected layout for market1501" in str(err.value)


def test_market_root_without_train_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="no bounding_box_train") as err:
        load_reid_splits("market1501", tmp_path / "empty")
    assert isinstance(err.value, DcalError)


def test_dukemtmc_names(tmp_path):
    splits = load_reid_splits("dukemtmc", make_market_like(tmp_path / "DukeMTMC-reID", DUKE).parent)
    assert fields(splits.train, "pid") == [1, 1, 8]
    assert fields(splits.train, "label") == [0, 0, 1]
    assert fields(splits.train, "camid") == [1, 4, 0]
    assert fields(splits.query, "pid") == [5] and fields(splits.query, "camid") == [1]
    assert fields(splits.gallery, "pid") == [5, 19] and fields(splits.gallery, "camid") == [0, 7]
    jpeg(tmp_path / "DukeMTMC-reID" / "query" / "0002_c1s1_000451_03.jpg")  # a Market name
    with pytest.raises(DatasetLayoutError, match="0002_c1s1_000451_03.jpg") as err:
        load_reid_splits("dukemtmc", tmp_path)
    assert "names like 0001_c2_f0046182.jpg" in str(err.value)


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_msmt17_detects_version_and_parses_camera_field(tmp_path, version):
    base = make_msmt(tmp_path, version)
    for root in (tmp_path, base):
        splits = load_reid_splits("msmt17", root)
        assert splits.version == f"MSMT17_{version}" and splits.root == base
        assert fields(splits.train, "pid") == [0, 0, 3]  # list_train + list_val
        assert fields(splits.train, "label") == [0, 0, 1]
        assert fields(splits.train, "camid") == [0, 10, 14]  # cameras 01, 11, 15: the third field
        assert fields(splits.query, "camid") == [4]
        assert fields(splits.gallery, "pid") == [0, 1] and fields(splits.gallery, "camid") == [1, 6]
    images = "train" if version == "V1" else "mask_train_v2"
    assert splits.train[0].path == base / images / "0000" / "0000_000_01_0303morning_0015_0.jpg"
    assert "msmt17 (MSMT17_" in splits.summary()


def test_msmt17_include_val(tmp_path):
    base = make_msmt(tmp_path)
    (base / "list_val.txt").unlink()
    with pytest.raises(DatasetLayoutError) as err:
        load_reid_splits("msmt17", base)
    assert str(base / "list_val.txt") in str(err.value)
    splits = load_reid_splits("msmt17", base, include_val=False)
    assert fields(splits.train, "pid") == [0, 0] and splits.num_train_ids == 1
    with pytest.raises(UsageError, match="include_val"):
        load_reid_splits("msmt17", base, include_val="no")


def test_msmt17_paths_prefixed_with_the_image_folder(tmp_path):
    base = make_msmt(tmp_path)
    rows = (base / "list_query.txt").read_text().splitlines()
    (base / "list_query.txt").write_text("".join(f"test/{row}\n" for row in rows))
    splits = load_reid_splits("msmt17", base)
    assert splits.query[0].path == base / "test" / "0000" / "0000_000_05_0303morning_0008_0.jpg"


def test_msmt17_errors_name_the_file(tmp_path):
    base = make_msmt(tmp_path)
    missing = base / "test" / "0001" / "0001_000_07_0304noon_0201_0.jpg"
    missing.unlink()
    with pytest.raises(DatasetLayoutError) as err:
        load_reid_splits("msmt17", base)
    assert str(base / "list_gallery.txt") in str(err.value) and str(missing) in str(err.value)
    (base / "list_query.txt").write_text("0000/0000_000_05_0303morning_0008_0.jpg\n")
    with pytest.raises(DatasetLayoutError, match=r"list_query\.txt:1: expected"):
        load_reid_splits("msmt17", base)
    (base / "list_query.txt").write_text("0000/badname.jpg 0\n")
    with pytest.raises(DatasetLayoutError, match="badname.jpg"):
        load_reid_splits("msmt17", base)


def test_msmt17_without_image_folders_or_with_both_versions(tmp_path):
    base = make_msmt(tmp_path)
    shutil.rmtree(base / "test")
    with pytest.raises(DatasetLayoutError) as err:
        load_reid_splits("msmt17", base)
    assert str(base / "test") in str(err.value) and "mask_test_v2" in str(err.value)
    make_msmt(tmp_path, "V2")
    with pytest.raises(DatasetLayoutError, match="several datasets"):
        load_reid_splits("msmt17", tmp_path)


def test_veri776_reads_the_name_lists(tmp_path):
    base = make_veri(tmp_path)
    splits = load_reid_splits("veri776", tmp_path)
    assert splits.root == base
    assert fields(splits.train, "pid") == [1, 1, 5]  # 0009_... is on disk but not listed
    assert fields(splits.train, "label") == [0, 0, 1]
    assert fields(splits.train, "camid") == [0, 1, 18]
    assert fields(splits.query, "pid") == [2] and fields(splits.query, "camid") == [1]
    assert fields(splits.gallery, "pid") == [2, 6] and fields(splits.gallery, "camid") == [2, 19]


def test_veri776_missing_list_or_image(tmp_path):
    base = make_veri(tmp_path)
    (base / "image_test" / "0006_c020_00040000_0.jpg").unlink()
    with pytest.raises(DatasetLayoutError) as err:
        load_reid_splits("veri776", base)
    assert str(base / "name_test.txt") in str(err.value) and "0006_c020_00040000_0.jpg" in str(err.value)
    (base / "name_query.txt").unlink()
    with pytest.raises(DatasetLayoutError) as err:
        load_reid_splits("veri776", base)
    assert str(base / "name_query.txt") in str(err.value) and "image_query/" in str(err.value)


def test_reid_folder_without_cameras(tmp_path):
    splits = load_reid_splits("reid_folder", make_reid_folder(tmp_path))
    assert splits.identity_names == ("alice", "bob", "xia", "yan", "zed")
    assert fields(splits.train, "pid") == [0, 0, 1, 1] and fields(splits.train, "label") == [0, 0, 1, 1]
    assert [r.path.name for r in splits.train] == [
        "alice_c1_1.jpg",
        "alice_c3_2.jpg",
        "bob_c1_2.png",
        "bob_c2_1.jpg",
    ]
    # the same folder name is the same pid in query and gallery
    assert fields(splits.query, "pid") == [3, 4]
    assert fields(splits.gallery, "pid") == [2, 3, 4, 4]
    assert not splits.has_cameras
    assert set(fields(splits.train + splits.query + splits.gallery, "camid")) == {-1}
    assert "no camera ids" in splits.summary()


def test_reid_folder_camera_regex(tmp_path):
    root = make_reid_folder(tmp_path)
    splits = load_reid_splits("reid_folder", root, camera_regex=r"_c(\d+)_")
    assert splits.has_cameras
    # cameras 1, 2, 3, 10 -> 0, 1, 2, 3 (numeric order, shared by all splits)
    assert fields(splits.train, "camid") == [0, 2, 0, 1]
    assert fields(splits.query, "camid") == [1, 0]
    assert fields(splits.gallery, "camid") == [0, 3, 0, 1]
    jpeg(root / "gallery" / "zed" / "zed_nocamera.jpg")
    with pytest.raises(DatasetLayoutError, match="zed_nocamera.jpg"):
        load_reid_splits("reid_folder", root, camera_regex=r"_c(\d+)_")
    with pytest.raises(UsageError, match="exactly one group"):
        load_reid_splits("reid_folder", root, camera_regex=r"_c\d+_")


def test_reid_folder_missing_split(tmp_path):
    root = make_reid_folder(tmp_path)
    shutil.rmtree(root / "gallery")
    with pytest.raises(DatasetLayoutError) as err:
        load_reid_splits("reid_folder", root)
    assert str(root / "gallery") in str(err.value) and "query/<identity>" in str(err.value)


def test_unknown_dataset_option_and_root(tmp_path):
    with pytest.raises(UsageError, match="valid names"):
        load_reid_splits("market", tmp_path)
    with pytest.raises(UsageError, match="valid options"):
        load_reid_splits("market1501", tmp_path, include_val=True)
    with pytest.raises(DatasetLayoutError, match="nowhere"):
        load_reid_splits("veri776", tmp_path / "nowhere")


def test_datasets_return_tensor_and_label(tmp_path):
    splits = load_reid_splits("market1501", make_market(tmp_path))
    train_tf = build_reid_train_transform("16x8", MEAN, STD, seed=0)
    data = build_reid_datasets(splits, train_tf, build_reid_eval_transform("16x8", MEAN, STD))
    image, label = data.train[3]
    assert isinstance(image, torch.Tensor) and image.shape == (3, 16, 8) and label == 1  # pid 7 -> 1
    image, label = data.gallery[1]
    assert image.shape == (3, 16, 8) and label == 1  # original pid
    np.testing.assert_array_equal(data.gallery.pids, [0, 1, 1, 3])
    np.testing.assert_array_equal(data.gallery.camids, [5, 0, 1, 3])
    np.testing.assert_array_equal(data.train.labels, [0, 0, 0, 1, 1, 2, 2])
    assert data.query.paths == [r.path for r in splits.query]
    batch = next(iter(torch.utils.data.DataLoader(data.train, batch_size=7)))
    assert batch[0].shape == (7, 3, 16, 8) and batch[1].tolist() == [0, 0, 0, 1, 1, 2, 2]


def test_corrupt_image_raises_or_is_dropped(tmp_path):
    splits = load_reid_splits("market1501", make_market(tmp_path))
    bad = splits.gallery[2].path
    bad.write_bytes(b"not a jpeg")
    gallery = ReIDDataset(splits.gallery, description="market1501 gallery")
    with pytest.raises(CorruptImageError, match=bad.name):
        gallery[2]
    gallery.drop_corrupt()
    assert len(gallery) == 3 and bad not in gallery.paths
    np.testing.assert_array_equal(gallery.pids, [0, 1, 3])
    assert gallery.skipped[0][0] == bad


def test_parse_reid_size():
    assert parse_reid_size("256x128") == (256, 128)
    assert parse_reid_size((384, 128)) == (384, 128)
    assert parse_reid_size(224) == (224, 224)
    for bad in ("256*128", "x128", (256,), 0):
        with pytest.raises(UsageError):
            parse_reid_size(bad)


def normalized(colour, mean=MEAN, std=STD):
    return (np.asarray(colour) / 255.0 - np.asarray(mean)) / np.asarray(std)


def test_eval_transform_resizes_to_height_by_width_and_normalizes():
    image = np.full((20, 10, 3), (200, 30, 60), dtype=np.uint8)
    out = build_reid_eval_transform("16x8", MEAN, STD)(image)
    assert out.shape == (3, 16, 8)
    np.testing.assert_allclose(out[:, 5, 3].numpy(), normalized((200, 30, 60)), atol=1e-5)


def test_train_transform_pads_crops_and_erases():
    image = np.full((8, 8, 3), 255, dtype=np.uint8)
    white, black = normalized((255, 255, 255)), normalized((0, 0, 0))

    def outputs(**kwargs):
        tf = build_reid_train_transform((16, 8), MEAN, STD, seed=0, **kwargs)
        return [tf(image).permute(1, 2, 0).numpy() for _ in range(20)]

    def has(pixels, value):
        return np.isclose(pixels, value, atol=1e-5).all(axis=-1).any()

    padded = outputs(erasing_p=0.0)
    assert all(o.shape == (16, 8, 3) for o in padded)
    assert any(has(o, black) for o in padded)  # zero padding shows after the random crop
    assert not any(has(o, black) for o in outputs(erasing_p=0.0, pad=0))
    erased = outputs(erasing_p=1.0, pad=0)
    assert all(has(o, 0.0) and has(o, white) for o in erased)  # erased to the mean (0 after normalizing)
    assert not any(has(o, 0.0) for o in outputs(erasing_p=0.0, pad=0))
