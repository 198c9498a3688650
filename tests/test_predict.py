"""predict.py and dual_cross_attention.prediction: a tiny model trained for one epoch, run on a
folder of images that holds a corrupt file, a non-image and nested folders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from dual_cross_attention.checkpoint import load_checkpoint
from dual_cross_attention.config import ConfigError, load_config
from dual_cross_attention.data import build_eval_transform, load_rgb
from dual_cross_attention.data.synthetic import DemoSpec, generate_demo_dataset
from dual_cross_attention.inference import check_mode
from dual_cross_attention.prediction import (
    Skipped,
    checkpoint_config,
    find_images,
    load_trained,
    predict_files,
    predictions_frame,
)
from dual_cross_attention.trainer import train

ROOT = Path(__file__).parents[1]
CLASSES = ["001.mark_a", "002.mark_b", "003.mark_c"]
DEIT_MEAN, DEIT_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's deit_tiny pretrained_cfg


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("predict")
    spec = DemoSpec(seed=4, image_size=32, train_per_class=4, test_per_class=1, num_classes=3)
    root = generate_demo_dataset(base / "cub", spec)
    overrides = [
        "data.dataset=cub", f"data.root={root}", "data.img_size=32", "data.resize_size=32",
        "data.num_workers=0", "model.backbone=deit_tiny_patch16_224", "model.pretrained=false",
        "model.backbone_kwargs={patch_size: 8, embed_dim: 48, depth: 2, num_heads: 3}",
        "train.epochs=1", "train.batch_size=4", "train.gradient_accumulation_steps=1",
        "train.warmup_epochs=0", "train.device=cpu", f"run.output_dir={base / 'runs'}", "run.name=tiny",
    ]  # fmt: skip
    result = train(load_config(None, overrides), show_progress=False)
    return result.run_dir / "checkpoints" / "last.pt"


@pytest.fixture
def folder(tmp_path) -> Path:
    """photos/a.jpg, photos/nested/deeper/b.png, photos/nested/c.WEBP, a corrupt d.jpg, notes.txt."""
    photos = tmp_path / "photos"
    (photos / "nested" / "deeper").mkdir(parents=True)
    rng = torch.Generator().manual_seed(0)
    for path, size in (("a.jpg", 40), ("nested/deeper/b.png", 32), ("nested/c.WEBP", 50)):
        pixels = torch.randint(0, 256, (size, size + 6, 3), generator=rng, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(photos / path)
    (photos / "d.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (photos / "notes.txt").write_text("not an image")
    return photos


def test_find_images_recurses_and_reports_what_it_cannot_use(folder, tmp_path):
    (tmp_path / "empty").mkdir()
    inputs = [folder, folder / "a.jpg", folder / "notes.txt", tmp_path / "missing.png", tmp_path / "empty"]
    paths, skipped = find_images(inputs)
    names = [p.relative_to(folder).as_posix() for p in paths]
    assert names == ["a.jpg", "d.jpg", "nested/c.WEBP", "nested/deeper/b.png"]  # sorted, a.jpg once
    assert skipped == [
        Skipped(folder / "notes.txt", "not a .jpg/.jpeg/.png/.webp file"),
        Skipped(tmp_path / "missing.png", "no such file or folder"),
        Skipped(tmp_path / "empty", "folder holds no .jpg/.jpeg/.png/.webp files"),
    ]


def test_predict_skips_the_corrupt_file_and_matches_the_model(checkpoint, folder):
    trained = load_trained(checkpoint)
    paths, _ = find_images([folder])
    predictions, skipped = predict_files(trained, paths, mode="sa+glca", top_k=3, batch_size=2)
    assert [s.path.name for s in skipped] == ["d.jpg"] and "cannot decode image" in skipped[0].reason
    assert [p.path.name for p in predictions] == ["a.jpg", "c.WEBP", "b.png"]
    transform = build_eval_transform(32, 32, DEIT_MEAN, DEIT_STD)
    for p in predictions:
        expected = trained.model.predict(transform(load_rgb(p.path))[None], "sa+glca")[0] / 2
        order = expected.argsort(descending=True).tolist()
        assert p.classes == [CLASSES[i] for i in order]
        assert p.probabilities == pytest.approx(expected[order].tolist(), abs=1e-5)
        assert sum(p.probabilities) == pytest.approx(1.0, abs=1e-5)  # all 3 classes: a distribution


def test_top_k_and_modes(checkpoint, folder):
    trained = load_trained(checkpoint)
    predictions, _ = predict_files(trained, [folder / "a.jpg"], mode="sa", top_k=1)
    expected = trained.model.predict(
        build_eval_transform(32, 32, DEIT_MEAN, DEIT_STD)(load_rgb(folder / "a.jpg"))[None], "sa"
    )[0]
    assert predictions[0].classes == [CLASSES[int(expected.argmax())]]
    assert predictions[0].probabilities == pytest.approx([float(expected.max())], abs=1e-5)
    capped, _ = predict_files(trained, [folder / "a.jpg"], top_k=10)
    assert len(capped[0].classes) == 3
    with pytest.raises(ValueError, match=r"mode 'glca' is not available .*model.glca: false"):
        check_mode("glca", ("sa",))
    frame = predictions_frame(capped)
    assert list(frame.columns) == ["path", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3"]


def test_device_override_and_bad_override(checkpoint):
    state = load_checkpoint(checkpoint)
    assert checkpoint_config(state, checkpoint, ["train.device=cpu", "data.root=/elsewhere"]).data.root == (
        "/elsewhere"
    )
    with pytest.raises(ConfigError, match="--set train.devise=cpu: unknown key 'devise'"):
        checkpoint_config(state, checkpoint, ["train.devise=cpu"])


def test_predict_script_on_a_folder_with_a_corrupt_file(checkpoint, folder, tmp_path):
    out = tmp_path / "predictions.csv"
    command = [
        sys.executable, str(ROOT / "predict.py"), "--checkpoint", str(checkpoint), str(folder),
        "--top-k", "2", "--csv", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipped 1 input(s)" in result.stdout and "d.jpg" in result.stdout
    frame = pd.read_csv(out)
    assert len(frame) == 3 and list(frame.columns) == ["path", "class_1", "prob_1", "class_2", "prob_2"]
    assert set(frame["class_1"]) <= set(CLASSES)
    assert (frame["prob_1"] >= frame["prob_2"]).all()
