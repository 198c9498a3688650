"""evaluate.py and dual_cross_attention.evaluation on a tiny model trained for one epoch on a
fabricated CUB-layout set whose test split is deliberately unbalanced (class sizes 1, 2, 3, 4,
1, 2, 3), so that mean per-class accuracy and top-1 differ."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dual_cross_attention.builders import build_model
from dual_cross_attention.checkpoint import load_checkpoint
from dual_cross_attention.config import ConfigError, from_dict, load_config
from dual_cross_attention.data import build_dataset, build_eval_transform
from dual_cross_attention.data.synthetic import DemoSpec, generate_demo_dataset
from dual_cross_attention.errors import UsageError
from dual_cross_attention.evaluation import (
    ClassMismatchError,
    EvaluationReport,
    Tally,
    evaluate_checkpoint,
    most_confused,
    require_each_image_once,
    summarize,
)
from dual_cross_attention.inference import class_probabilities
from dual_cross_attention.models import PREDICT_MODES
from dual_cross_attention.prediction import load_trained
from dual_cross_attention.trainer import train
from dual_cross_attention.visualize import CONFUSION_INCHES, DPI, attention_grid_size

ROOT = Path(__file__).parents[1]
NUM_CLASSES = 7
TEST_SIZES = [label % 4 + 1 for label in range(NUM_CLASSES)]  # 1, 2, 3, 4, 1, 2, 3 -> 16 images
DEIT_MEAN, DEIT_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's deit_tiny pretrained_cfg


def unbalance_test_split(root: Path) -> None:
    """Keep TEST_SIZES[label] test images per class; the other test images become training images."""
    labels = dict(line.split() for line in (root / "image_class_labels.txt").read_text().splitlines())
    kept: dict[int, int] = defaultdict(int)
    lines = []
    for line in (root / "train_test_split.txt").read_text().splitlines():
        image_id, is_train = line.split()
        label = int(labels[image_id]) - 1
        if is_train == "0" and kept[label] < TEST_SIZES[label]:
            kept[label] += 1
        else:
            is_train = "1"
        lines.append(f"{image_id} {is_train}\n")
    (root / "train_test_split.txt").write_text("".join(lines))


def tiny_overrides(root: Path, out: Path) -> list[str]:
    return [
        "data.dataset=cub", f"data.root={root}", "data.img_size=32", "data.resize_size=32",
        "data.num_workers=0", "data.eval_batch_size=5", "model.backbone=deit_tiny_patch16_224",
        "model.pretrained=false",
        "model.backbone_kwargs={patch_size: 8, embed_dim: 48, depth: 2, num_heads: 3}",
        "train.epochs=1", "train.batch_size=4", "train.gradient_accumulation_steps=1", "train.base_lr=1e-3",
        "train.warmup_epochs=0", "train.device=cpu", f"run.output_dir={out}", "run.name=tiny",
    ]  # fmt: skip


@dataclass
class Trained:
    checkpoint: Path
    data_root: Path
    run_dir: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    base = tmp_path_factory.mktemp("evaluate")
    spec = DemoSpec(seed=3, image_size=32, train_per_class=2, test_per_class=4, num_classes=NUM_CLASSES)
    root = generate_demo_dataset(base / "cub", spec)
    unbalance_test_split(root)
    result = train(load_config(None, tiny_overrides(root, base / "runs")), show_progress=False)
    return Trained(result.run_dir / "checkpoints" / "last.pt", root, result.run_dir)


@pytest.fixture(scope="module")
def evaluated(trained: Trained) -> EvaluationReport:
    return evaluate_checkpoint(trained.checkpoint, visualize=3, throughput_iterations=1)


@dataclass
class Reference:
    labels: list[int]
    probs: dict[str, torch.Tensor]  # mode -> (N, K)


@pytest.fixture(scope="module")
def reference(trained: Trained) -> Reference:
    """Probabilities from ``DualViT.predict`` over the test images, built without evaluation.py."""
    state = load_checkpoint(trained.checkpoint)
    model = build_model(from_dict(state["config"]), NUM_CLASSES)
    model.load_state_dict(state["model"])
    dataset = build_dataset(
        "cub", trained.data_root, "test", build_eval_transform(32, 32, DEIT_MEAN, DEIT_STD)
    )
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    probs = {mode: model.predict(images, mode) for mode in PREDICT_MODES}
    return Reference(labels=list(dataset.targets), probs=probs)


def hand_metrics(labels: list[int], probs: torch.Tensor) -> dict[str, float]:
    """top-1, top-5 and the mean over classes of each class's top-1, counted image by image."""
    ranked = probs.argsort(dim=1, descending=True).tolist()
    hits: dict[int, list[bool]] = defaultdict(list)
    top1 = top5 = 0
    for label, order in zip(labels, ranked, strict=True):
        hits[label].append(order[0] == label)
        top1 += order[0] == label
        top5 += label in order[:5]
    per_class = [sum(h) / len(h) for h in hits.values()]
    n = len(labels)
    return {
        "top1": 100 * top1 / n,
        "top5": 100 * top5 / n,
        "mean_class": 100 * sum(per_class) / len(per_class),
    }


def test_json_has_the_issue_fields_and_counts_every_image_once(trained, evaluated):
    results = evaluated.results
    assert set(results) == {"sa", "glca", "sa+glca", "num_images", "checkpoint", "split", "provenance"}
    assert results["num_images"] == sum(TEST_SIZES) == 16
    assert results["split"] == "test"
    assert Path(results["checkpoint"]) == trained.checkpoint.resolve()
    for mode in PREDICT_MODES:
        assert set(results[mode]) == {"top1", "top5", "mean_class"}
    assert json.loads(json.dumps(results)) == results  # plain JSON types only


def test_metrics_match_a_hand_computation(evaluated, reference):
    for mode in PREDICT_MODES:
        expected = hand_metrics(reference.labels, reference.probs[mode])
        assert evaluated.results[mode] == pytest.approx(expected), mode


def test_top1_matches_what_training_logged_for_the_same_checkpoint(trained, evaluated):
    logged = pd.read_csv(trained.run_dir / "metrics.csv").iloc[-1]
    for mode, column in (
        ("sa", "eval_top1_sa"),
        ("glca", "eval_top1_glca"),
        ("sa+glca", "eval_top1_sa_glca"),
    ):
        assert evaluated.results[mode]["top1"] == pytest.approx(logged[column]), mode


def test_per_class_and_confusion_tables(trained, evaluated, reference):
    out = trained.checkpoint.parent / "last_test"  # default: next to the checkpoint
    assert evaluated.out_dir == out
    per_class = pd.read_csv(out / "per_class.csv")
    assert list(per_class.columns) == ["class", "count", "accuracy_sa", "accuracy_glca", "accuracy_sa_glca"]
    assert list(per_class["count"]) == TEST_SIZES
    labels = np.array(reference.labels)
    predicted = reference.probs["sa+glca"].argmax(dim=1).numpy()
    for label in range(NUM_CLASSES):
        mine = labels == label
        assert per_class["accuracy_sa_glca"][label] == pytest.approx(100 * (predicted[mine] == label).mean())
    confusions = pd.read_csv(out / "confusions.csv")
    errors = defaultdict(int)
    for true, pred in zip(labels, predicted, strict=True):
        if true != pred:
            errors[(per_class["class"][true], per_class["class"][pred])] += 1
    listed = {(r.true_class, r.predicted_class): r.count for r in confusions.itertuples()}
    assert listed == dict(errors)  # fewer than 20 pairs here, so all of them
    assert set(confusions["mode"]) <= {"sa+glca"}


def test_pictures_are_valid_pngs_of_the_expected_size(trained, evaluated):
    out = evaluated.out_dir
    with Image.open(out / "confusion.png") as image:
        image.verify()
    with Image.open(out / "confusion.png") as image:
        assert image.size == (round(CONFUSION_INCHES[0] * DPI), round(CONFUSION_INCHES[1] * DPI))
    with Image.open(out / "attention_grid.png") as image:
        assert image.format == "PNG" and image.size == attention_grid_size(3) == (720, 720)
        assert np.asarray(image.convert("L")).std() > 10  # not a blank canvas


def test_tally_mean_class_by_hand():
    # Class sizes 3, 1, 2 and one class without images; per-class accuracy 2/3, 1, 1/2.
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    predicted = torch.tensor([0, 1, 0, 1, 0, 2])
    tally = Tally.zeros(4, ("sa",))
    tally.add("sa", torch.nn.functional.one_hot(predicted, 4).float(), labels)
    summary = summarize(tally, ["a", "b", "c", "d"])
    metrics = summary.metrics["sa"]
    assert metrics["top1"] == pytest.approx(100 * 4 / 6)
    assert metrics["mean_class"] == pytest.approx(100 * (2 / 3 + 1 + 1 / 2) / 3)  # 72.2, not 66.7
    assert summary.num_images == 6
    assert list(summary.per_class["count"]) == [3, 1, 2, 0]
    assert np.isnan(summary.per_class["accuracy_sa"][3])
    require_each_image_once(tally.num_images, 6, "toy")
    with pytest.raises(RuntimeError, match="evaluated 6 images but toy has 5"):
        require_each_image_once(tally.num_images, 5, "toy")


def test_tally_top5_counts_the_label_among_the_five_best():
    scores = torch.tensor([[6.0, 5, 4, 3, 2, 1, 0], [0.0, 1, 2, 3, 4, 5, 6], [0.0, 1, 2, 3, 4, 5, 6]])
    tally = Tally.zeros(7, ("sa",))
    tally.add("sa", scores, torch.tensor([4, 1, 6]))  # rank 5: hit; rank 6: miss; rank 1: hit
    assert tally.top5_hits["sa"].tolist() == [0, 0, 0, 0, 1, 0, 1]
    assert summarize(tally, list("abcdefg")).metrics["sa"]["top5"] == pytest.approx(100 * 2 / 3)


def test_most_confused_orders_by_count_and_gives_the_share():
    confusion = np.array([[5, 3, 0], [1, 0, 1], [4, 0, 2]])
    table = most_confused(confusion, ["a", "b", "c"], limit=3)
    assert list(zip(table.true_class, table.predicted_class, table["count"], strict=True)) == [
        ("c", "a", 4),
        ("a", "b", 3),
        ("b", "a", 1),
    ]
    assert table["share"].tolist() == pytest.approx([100 * 4 / 6, 100 * 3 / 8, 100 * 1 / 2])


def test_tta_flip_averages_the_image_and_its_mirror(trained, reference):
    model = load_trained(trained.checkpoint).model
    dataset = build_dataset(
        "cub", trained.data_root, "test", build_eval_transform(32, 32, DEIT_MEAN, DEIT_STD)
    )
    images = torch.stack([dataset[i][0] for i in range(4)])
    probs, _ = class_probabilities(model, images, PREDICT_MODES, tta="flip")
    for mode in PREDICT_MODES:
        expected = (model.predict(images, mode) + model.predict(images.flip(-1), mode)) / 2
        torch.testing.assert_close(probs[mode], expected)
        assert not torch.allclose(probs[mode], reference.probs[mode][:4])  # the flip did change something
    report = evaluate_checkpoint(trained.checkpoint, tta="flip", throughput_iterations=0)
    assert report.results["num_images"] == 16
    assert report.out_dir.name == "last_test_tta-flip"


def test_a_dataset_with_other_classes_is_refused(trained, tmp_path):
    spec = DemoSpec(seed=0, image_size=32, train_per_class=1, test_per_class=1, num_classes=5)
    other = generate_demo_dataset(tmp_path / "other", spec)
    with pytest.raises(ClassMismatchError, match=r"checkpoint has 7 classes, the dataset 5.*data.root="):
        evaluate_checkpoint(trained.checkpoint, overrides=[f"data.root={other}"], throughput_iterations=0)


def test_bad_overrides_name_the_override(trained):
    with pytest.raises(ConfigError, match=r"--set data.rooot=x: unknown key 'rooot'.*valid keys"):
        evaluate_checkpoint(trained.checkpoint, overrides=["data.rooot=x"])
    with pytest.raises(
        UsageError, match=r"model.backbone_kwargs.depth is fixed by the checkpoint.*data.root"
    ):
        evaluate_checkpoint(trained.checkpoint, overrides=["model.backbone_kwargs.depth=3"])
    with pytest.raises(UsageError, match="model.top_ratio is fixed"):
        evaluate_checkpoint(trained.checkpoint, overrides=["model.top_ratio=0.5"])  # fits the weights


def test_sa_only_throughput_forward_is_the_sa_branch(trained, reference):
    model = load_trained(trained.checkpoint).model
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(images), model(images).sa_logits, rtol=1e-4, atol=1e-5)


def test_throughput_is_reported(evaluated):
    speed = evaluated.throughput
    assert speed is not None and speed.batch_size == 5 and speed.device == "cpu"
    assert speed.sa > 0 and speed.sa_glca is not None and speed.sa_glca > 0


def test_evaluate_script_prints_the_table_and_writes_json(trained, tmp_path):
    command = [
        sys.executable, str(ROOT / "evaluate.py"), "--checkpoint", str(trained.checkpoint),
        "--json", str(tmp_path / "r.json"), "--out", str(tmp_path / "out"), "--visualize", "2",
        "--throughput-iters", "1", "--no-progress",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mean-class" in result.stdout and "SA+GLCA" in result.stdout and "images/s" in result.stdout
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["num_images"] == 16 and results["split"] == "test"
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert written == {"per_class.csv", "confusions.csv", "confusion.png", "attention_grid.png"}
    with Image.open(tmp_path / "out" / "attention_grid.png") as image:
        assert image.size == attention_grid_size(2)


def load_script(name: str):
    """A top-level script as a module, to call its main() without paying for a new interpreter."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_script_reports_errors_with_exit_code_1(trained, tmp_path, capsys):
    script = load_script("evaluate")
    assert script.main(["--checkpoint", str(tmp_path / "missing.pt")]) == 1
    assert "no checkpoint at" in capsys.readouterr().err
    other = generate_demo_dataset(tmp_path / "other", DemoSpec(1, 32, 1, 1, num_classes=4))
    assert script.main(["--checkpoint", str(trained.checkpoint), "--set", f"data.root={other}"]) == 1
    assert "does not have the classes" in capsys.readouterr().err
