"""The demo set: deterministic, CUB layout, classes differ only by a grid-aligned mark, no colour cue."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dual_cross_attention.data import DatasetLayoutError, DemoSpec, build_dataset, generate_demo_dataset
from dual_cross_attention.data.synthetic import MARKS, _image_rng, mark_mask, render_image

SMALL = DemoSpec(seed=3, train_per_class=2, test_per_class=1)


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    a = _files(generate_demo_dataset(tmp_path / "a", SMALL))
    b = _files(generate_demo_dataset(tmp_path / "b", SMALL))
    c = _files(generate_demo_dataset(tmp_path / "c", DemoSpec(seed=4, train_per_class=2, test_per_class=1)))
    assert a == b
    images = [k for k in a if k.suffix == ".jpg"]
    assert len(images) == 30
    assert all(a[k] != c[k] for k in images)


def test_build_dataset_generates_on_first_use(tmp_path):
    options = {"seed": 3, "train_per_class": 2, "test_per_class": 1}
    train = build_dataset("synthetic", tmp_path / "demo", "train", **options)
    test = build_dataset("synthetic", tmp_path / "demo", "test", **options)
    assert (tmp_path / "demo" / "images.txt").is_file()
    assert len(train) == 20 and len(test) == 10
    assert train.classes[0] == "001.mark_a" and len(train.classes) == 10
    assert sorted(train.targets) == sorted(list(range(10)) * 2)
    assert test.targets == list(range(10))
    image, _ = train[0]
    assert image.shape == (64, 64, 3)


def test_existing_set_is_reused_and_a_changed_spec_regenerates(tmp_path):
    root = generate_demo_dataset(tmp_path / "demo", SMALL)
    first = root / "images.txt"
    stamp = first.stat().st_mtime_ns
    generate_demo_dataset(root, SMALL)
    assert first.stat().st_mtime_ns == stamp
    generate_demo_dataset(root, DemoSpec(seed=3, train_per_class=1, test_per_class=1))
    assert len(first.read_text().splitlines()) == 20
    assert not [p for p in tmp_path.iterdir() if p.name != "demo"]  # no temp dirs left behind


def test_foreign_directory_is_never_overwritten(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "mine.txt").write_text("precious")
    with pytest.raises(DatasetLayoutError, match="demo_info.json"):
        generate_demo_dataset(tmp_path / "demo", SMALL)
    assert (tmp_path / "demo" / "mine.txt").read_text() == "precious"


def test_marks_are_symmetric_equal_weight_and_far_apart():
    masks = [mark_mask(label) for label in range(len(MARKS))]
    assert len(masks) == 10
    for mask in masks:
        assert mask.shape == (8, 8)
        assert mask.sum() == 32  # 8 cells of 2x2 px: the same ink for every class
        np.testing.assert_array_equal(mask, mask[:, ::-1])  # a horizontal flip keeps the class
    for i in range(10):
        for j in range(i + 1, 10):
            assert (masks[i] != masks[j]).sum() >= 32


@pytest.mark.parametrize("copies", [1, 2])
def test_classes_differ_only_by_the_mark_on_the_patch_grid(copies):
    changed = mark_mask(0) != mark_mask(5)
    for index in range(20):
        a = render_image(0, _image_rng(0, "train", index), 64, copies).astype(int)
        b = render_image(5, _image_rng(0, "train", index), 64, copies).astype(int)
        differs = np.abs(a - b).sum(-1) > 0
        ys, xs = np.nonzero(differs)
        # every difference lies in `copies` side-by-side 8x8 grid cells, each holding one copy of
        # the pattern, exactly where the two patterns differ
        top, left = ys.min() // 8 * 8, xs.min() // 8 * 8
        assert ys.max() < top + 8 and xs.max() < left + 8 * copies
        for copy in range(copies):
            cell = differs[top : top + 8, left + 8 * copy : left + 8 * copy + 8]
            np.testing.assert_array_equal(cell, changed)


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="mark_copies"):
        DemoSpec(mark_copies=3)
    with pytest.raises(ValueError, match="multiple of 8"):
        DemoSpec(image_size=60)
    with pytest.raises(ValueError, match="num_classes"):
        DemoSpec(num_classes=11)


def test_mean_colour_does_not_predict_the_class():
    """A nearest-class-mean classifier on mean RGB stays near chance (10%)."""
    features = {split: [] for split in ("train", "test")}
    for split, n in (("train", 400), ("test", 200)):
        for index in range(n):
            image = render_image(index % 10, _image_rng(0, split, index), 64)
            features[split].append(image.reshape(-1, 3).mean(0))
    train, test = np.array(features["train"]), np.array(features["test"])
    centroids = np.stack([train[label::10].mean(0) for label in range(10)])
    predicted = np.argmin(((test[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = (predicted == np.arange(200) % 10).mean()
    assert accuracy < 0.2


def test_set_from_an_older_generator_is_regenerated(tmp_path):
    root = generate_demo_dataset(tmp_path / "demo", SMALL)
    info = root / "demo_info.json"
    recorded = json.loads(info.read_text())
    info.write_text(json.dumps(recorded | {"version": recorded["version"] - 1}))
    (root / "images.txt").write_text("stale\n")
    generate_demo_dataset(root, SMALL)
    assert len((root / "images.txt").read_text().splitlines()) == 30
