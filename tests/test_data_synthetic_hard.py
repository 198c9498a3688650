"""The hard demo set: CUB layout, deterministic, the class is the bird's mark among look-alike
decoys, and neither colour nor position gives the class away."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dual_cross_attention.data import build_dataset, generate_demo_dataset
from dual_cross_attention.data.synthetic import _image_rng, mark_mask
from dual_cross_attention.data.synthetic_hard import HardSpec, render_hard_image

SMALL = HardSpec(seed=3, train_per_class=2, test_per_class=1)
SPEC = HardSpec()


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generated_on_first_use_in_cub_layout_under_its_default_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    options = {"seed": 3, "train_per_class": 2, "test_per_class": 1}
    train = build_dataset("synthetic-hard", None, "train", **options)
    test = build_dataset("synthetic-hard", None, "test", **options)
    for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"):
        assert (tmp_path / "data" / "demo_hard" / name).is_file()
    assert len(train) == 20 and len(test) == 10
    assert train.classes[0] == "001.mark_a" and len(train.classes) == 10
    assert sorted(train.targets) == sorted(list(range(10)) * 2)
    image, label = train[0]
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and label == train.targets[0]


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    a = _files(generate_demo_dataset(tmp_path / "a", SMALL))
    b = _files(generate_demo_dataset(tmp_path / "b", SMALL))
    c = _files(generate_demo_dataset(tmp_path / "c", HardSpec(seed=4, train_per_class=2, test_per_class=1)))
    assert a == b
    images = [k for k in a if k.suffix == ".jpg"]
    assert len(images) == 30
    assert all(a[k] != c[k] for k in images)


def test_a_demo_set_in_the_root_is_replaced_by_the_hard_one(tmp_path):
    from dual_cross_attention.data import DemoSpec

    root = generate_demo_dataset(tmp_path / "set", DemoSpec(seed=3, train_per_class=2, test_per_class=1))
    demo = _files(root)
    assert _files(generate_demo_dataset(root, SMALL)) != demo
    assert '"distractors": 1' in (root / "demo_info.json").read_text()


def test_only_the_birds_mark_depends_on_the_class():
    changed = mark_mask(0) != mark_mask(5)
    for index in range(20):
        a, layout_a = render_hard_image(0, _image_rng(0, "train", index), SPEC)
        b, layout_b = render_hard_image(5, _image_rng(0, "train", index), SPEC)
        assert layout_a == layout_b  # decoys, their marks and all positions ignore the class
        differs = np.abs(a.astype(int) - b.astype(int)).sum(-1) > 0
        x, y = layout_a.bird_mark
        expected = np.zeros_like(differs)
        for copy in range(2):
            expected[y : y + 8, x + 8 * copy : x + 8 * copy + 8] = changed
        np.testing.assert_array_equal(differs, expected)


def _colour_features(image: np.ndarray) -> dict[str, np.ndarray]:
    pixels = image.reshape(-1, 3)
    histogram = np.histogramdd(pixels, bins=(4, 4, 4), range=[(0, 256)] * 3)[0].ravel() / len(pixels)
    return {"mean colour": pixels.mean(0), "colour histogram": histogram}


def _position_features(layout) -> np.ndarray:
    """Where the marks are, one-hot on the 8 x 8 cell grid: the bird's, then the decoys' counts."""
    bird, decoys = np.zeros(64), np.zeros(64)
    bird[layout.bird_mark[1] // 8 * 8 + layout.bird_mark[0] // 8] = 1
    for x, y in layout.decoy_marks:
        decoys[y // 8 * 8 + x // 8] += 1
    return np.concatenate([bird, decoys])


def _nearest_mean(train_x, train_y, test_x) -> np.ndarray:
    centroids = np.stack([train_x[train_y == c].mean(0) for c in range(10)])
    return np.argmin(((test_x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)


def _linear_probe(train_x, train_y, test_x) -> np.ndarray:
    """Softmax regression on standardised features (L2-regularised, L-BFGS)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x = torch.tensor((train_x - mean) / std, dtype=torch.float32)
    y = torch.tensor(train_y)
    weight = torch.zeros(x.shape[1], 10, requires_grad=True)
    bias = torch.zeros(10, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 1e-3 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    test = torch.tensor((test_x - mean) / std, dtype=torch.float32)
    return (test @ weight + bias).argmax(1).detach().numpy()


@pytest.fixture(scope="module")
def samples():
    """Features and layouts of 400 train and 200 test images (chance: 10%)."""
    out = {}
    for split, n in (("train", 400), ("test", 200)):
        rows, layouts = [], []
        for index in range(n):
            image, layout = render_hard_image(index % 10, _image_rng(0, split, index), SPEC)
            rows.append(_colour_features(image) | {"position": _position_features(layout)})
            layouts.append(layout)
        features = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        out[split] = (features, np.arange(n) % 10, layouts)
    return out


def test_decoys_carry_marks_so_the_bag_of_marks_leaves_the_class_open(samples):
    """Guessing among the marks an image shows (the most frequent, ties split evenly) is right
    55% of the time in expectation with one decoy (0.9 x 1/2 + 0.1 x 1), far from what the
    bird's mark gives (100%)."""
    _, labels, layouts = samples["train"]
    scores = []
    for label, layout in zip(labels, layouts, strict=True):
        assert len(layout.decoy_marks) == len(layout.decoy_labels) == 1
        assert layout.bird_mark not in layout.decoy_marks
        counts = Counter((label, *layout.decoy_labels))
        top = [mark for mark, c in counts.items() if c == max(counts.values())]
        scores.append((label in top) / len(top))
    assert 0.5 < np.mean(scores) < 0.6


@pytest.mark.parametrize("feature", ["mean colour", "colour histogram", "position"])
@pytest.mark.parametrize("classifier", [_nearest_mean, _linear_probe])
def test_colour_and_position_do_not_predict_the_class(samples, feature, classifier):
    (train, train_y, _), (test, test_y, _) = samples["train"], samples["test"]
    accuracy = (classifier(train[feature], train_y, test[feature]) == test_y).mean()
    assert accuracy < 0.18, f"{feature}: {accuracy:.1%} with {classifier.__name__}"


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="distractors"):
        HardSpec(distractors=4)
    with pytest.raises(ValueError, match="at least 64"):
        HardSpec(image_size=56)
    with pytest.raises(ValueError, match="num_classes"):
        HardSpec(num_classes=11)
