"""search.py and dual_cross_attention.search_index: a tiny FGVC and a tiny Re-ID checkpoint (one
epoch each), a fabricated gallery of noise images in nested folders with one corrupt file.

The embeddings are checked against the model's own features computed here by hand, the images
the index embeds are counted at the model's forward, and the index file is read back as a plain
npz archive."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run
from PIL import Image
from test_reid_train import reid_overrides, write_market

from dual_cross_attention.checkpoint import load_checkpoint, save_checkpoint
from dual_cross_attention.config import load_config
from dual_cross_attention.data import build_eval_transform, load_rgb
from dual_cross_attention.data.reid_transforms import build_reid_eval_transform
from dual_cross_attention.prediction import TrainedModel, load_trained
from dual_cross_attention.search_index import (
    INDEX_NAME,
    search_figure_size,
    search_files,
    update_index,
)
from dual_cross_attention.trainer import train

ROOT = Path(__file__).parents[1]
DEIT_MEAN, DEIT_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's deit_tiny pretrained_cfg
IMAGES = ["a.jpg", "b.jpg", "birds/c.jpg", "birds/d.png", "birds/deep/e.jpg", "birds/deep/f.jpeg", "g.webp"]


@pytest.fixture(scope="module")
def fgvc_checkpoint(cub_root, tmp_path_factory) -> Path:
    result = run(cub_root, tmp_path_factory.mktemp("search_fgvc"), "train.epochs=1")
    return result.run_dir / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def reid_checkpoint(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("search_reid")
    root = write_market(base / "Market-1501")
    result = train(load_config(None, reid_overrides(root, base / "runs")), show_progress=False)
    return result.run_dir / "checkpoints" / "last.pt"


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 46)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def gallery(tmp_path) -> Path:
    """IMAGES (noise of different sizes), a corrupt corrupt.jpg and a notes.txt."""
    root = tmp_path / "gallery"
    for seed, name in enumerate(IMAGES):
        write_image(root / name, seed, (36 + 4 * seed, 30 + 3 * seed))
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


def count_images(trained: TrainedModel) -> list[int]:
    """The batch sizes every later forward of ``trained.model`` sees."""
    seen: list[int] = []
    forward = trained.model.forward

    def counting(images: torch.Tensor):
        seen.append(len(images))
        return forward(images)

    trained.model.forward = counting
    return seen


_REFERENCES: dict[tuple[Path, Path, int], dict[str, np.ndarray]] = {}


def reference(trained: TrainedModel, path: Path) -> dict[str, np.ndarray]:
    """``embed_one`` remembered per checkpoint and file version (the tests ask many times)."""
    key = (trained.checkpoint, path, path.stat().st_mtime_ns)
    if key not in _REFERENCES:
        _REFERENCES[key] = embed_one(trained, path)
    return _REFERENCES[key]


@torch.no_grad()
def embed_one(trained: TrainedModel, path: Path) -> dict[str, np.ndarray]:
    """The embedding of one file worked out here: the eval transform written out, then the class
    features (after the BNNeck's norm for Re-ID), sa+glca as the two L2-normalised halves."""
    model = trained.model
    if trained.config.task == "reid":
        transform = build_reid_eval_transform((32, 16), (0.5,) * 3, (0.5,) * 3)
    else:
        transform = build_eval_transform(32, 32, DEIT_MEAN, DEIT_STD)
    out = model(transform(load_rgb(path))[None])
    sa, glca = out.sa_features, out.glca_features
    if trained.config.task == "reid":
        sa, glca = model.backbone.head.neck(sa), model.glca_head.neck(glca)
    unit = torch.cat([sa / sa.norm(), glca / glca.norm()], dim=1)
    return {"sa": sa[0].numpy(), "glca": glca[0].numpy(), "sa+glca": unit[0].numpy()}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_index_holds_the_model_features_and_each_query_finds_itself(fgvc_checkpoint, gallery):
    trained = load_trained(fgvc_checkpoint)
    seen = count_images(trained)
    index, report = update_index(trained, gallery, batch_size=3)
    assert sum(seen) == len(IMAGES) and report.embedded == len(IMAGES) and report.reused == 0
    assert report.rebuilt == "no index yet" and report.written
    assert [s.path for s in report.skipped] == [gallery / "corrupt.jpg"]
    assert "cannot decode image" in report.skipped[0].reason

    with np.load(gallery / INDEX_NAME, allow_pickle=False) as data:
        assert list(data["paths"]) == sorted(IMAGES)
        assert list(data["mtime_ns"]) == [(gallery / p).stat().st_mtime_ns for p in sorted(IMAGES)]
        assert list(data["size"]) == [(gallery / p).stat().st_size for p in sorted(IMAGES)]
        assert list(data["modes"]) == ["sa", "glca", "sa+glca"]
        shapes = {m: (data[f"features_{m}"].shape, data[f"features_{m}"].dtype) for m in data["modes"]}
        assert shapes == {
            "sa": ((7, 48), np.float32),
            "glca": ((7, 48), np.float32),
            "sa+glca": ((7, 96), np.float32),
        }
        assert str(data["checkpoint_sha256"]) == file_sha256(fgvc_checkpoint)
        assert list(data["unreadable_paths"]) == ["corrupt.jpg"]
        assert "center-crop 32x32" in str(data["transform"]) and str(data["task"]) == "fgvc"
        for row, rel in enumerate(data["paths"]):
            for mode, expected in reference(trained, gallery / rel).items():
                np.testing.assert_allclose(data[f"features_{mode}"][row], expected, atol=1e-5)

    queries = [gallery / rel for rel in IMAGES]
    for mode in trained.modes:
        results, skipped = search_files(
            trained, index, gallery, queries + [gallery / "corrupt.jpg"], mode, top=3
        )
        assert [s.path.name for s in skipped] == ["corrupt.jpg"]
        assert [r.query for r in results] == queries
        for result in results:
            assert [m.rank for m in result.matches] == [1, 2, 3]
            assert result.matches[0].path == result.query
            assert result.matches[0].similarity == pytest.approx(1.0, abs=1e-5)
            similarities = [m.similarity for m in result.matches]
            assert similarities == sorted(similarities, reverse=True)
            q, g = reference(trained, result.query)[mode], reference(trained, result.matches[1].path)[mode]
            cosine = float(q @ g / np.linalg.norm(q) / np.linalg.norm(g))
            assert result.matches[1].similarity == pytest.approx(cosine, abs=1e-5)


def test_later_calls_embed_only_new_or_changed_files(fgvc_checkpoint, gallery):
    trained = load_trained(fgvc_checkpoint)
    update_index(trained, gallery)
    index_file = gallery / INDEX_NAME
    written_at = index_file.stat().st_mtime_ns
    seen = count_images(trained)

    index, report = update_index(trained, gallery)  # nothing changed: nothing embedded or written
    assert seen == [] and report.embedded == 0 and report.reused == 7 and report.rebuilt is None
    assert not report.written and index_file.stat().st_mtime_ns == written_at
    assert [s.path.name for s in report.skipped] == ["corrupt.jpg"]  # still reported, not decoded again

    def update(expected_embedded: int):
        seen.clear()
        index, report = update_index(trained, gallery)
        assert sum(seen) == report.embedded == expected_embedded
        return index, report

    write_image(gallery / "birds/c.jpg", seed=99, size=(50, 50))  # new content (and size)
    index, report = update(1)
    row = index.paths.index("birds/c.jpg")
    np.testing.assert_allclose(
        index.features["sa"][row], reference(trained, gallery / "birds/c.jpg")["sa"], atol=1e-5
    )

    a = gallery / "a.jpg"  # only the modification time changes
    os.utime(a, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns + 10**9))
    assert update(1)[1].reused == 6

    b = gallery / "b.jpg"  # only the size changes: bytes after the JPEG's end, same mtime
    stamp = b.stat()
    with open(b, "ab") as file:
        file.write(b"\0" * 16)
    os.utime(b, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    update(1)

    (gallery / "birds/deep/e.jpg").unlink()
    index, report = update(0)
    assert report.removed == 1 and "birds/deep/e.jpg" not in index.paths and len(index) == 6
    results, _ = search_files(trained, index, gallery, [gallery / "a.jpg"], top=10)
    assert len(results[0].matches) == 6 and gallery / "birds/deep/e.jpg" not in {
        m.path for m in results[0].matches
    }

    write_image(gallery / "corrupt.jpg", seed=7)  # repaired: embedded and no longer reported
    index, report = update(1)
    assert "corrupt.jpg" in index.paths and report.skipped == []


def test_the_checkpoint_hash_decides_whether_the_index_is_reused(fgvc_checkpoint, gallery, tmp_path):
    update_index(load_trained(fgvc_checkpoint), gallery)
    copy = tmp_path / "elsewhere" / "copy.pt"  # the same bytes under another path and mtime
    copy.parent.mkdir()
    shutil.copy(fgvc_checkpoint, copy)
    _, report = update_index(load_trained(copy), gallery)
    assert report.rebuilt is None and report.embedded == 0

    state = load_checkpoint(fgvc_checkpoint)
    state["model"]["backbone.cls_token"] += 0.5
    altered = save_checkpoint(state, tmp_path / "altered.pt")
    trained = load_trained(altered)
    seen = count_images(trained)
    index, report = update_index(trained, gallery)
    assert "the checkpoint changed (sha256" in report.rebuilt
    assert sum(seen) == report.embedded == 7 and report.reused == 0
    with np.load(gallery / INDEX_NAME, allow_pickle=False) as data:
        assert str(data["checkpoint_sha256"]) == file_sha256(altered)
    row = index.paths.index("a.jpg")
    np.testing.assert_allclose(
        index.features["glca"][row], reference(trained, gallery / "a.jpg")["glca"], atol=1e-5
    )

    (gallery / INDEX_NAME).write_bytes(b"not an npz archive")
    _, report = update_index(trained, gallery)
    assert "could not be read" in report.rebuilt and report.embedded == 7


def test_reid_checkpoint_ranks_by_its_retrieval_embedding(reid_checkpoint, gallery, tmp_path):
    trained = load_trained(reid_checkpoint)
    assert trained.config.task == "reid"
    index_file = tmp_path / "indexes" / "reid.npz"
    index, report = update_index(trained, gallery, index_file)
    assert report.embedded == 7 and index_file.is_file() and not (gallery / INDEX_NAME).exists()
    with np.load(index_file, allow_pickle=False) as data:
        assert str(data["transform"]).startswith("reid eval: resize to 32x16") and str(data["task"]) == "reid"
    for row, rel in enumerate(index.paths):
        for mode, expected in reference(trained, gallery / rel).items():
            np.testing.assert_allclose(index.features[mode][row], expected, atol=1e-5)
    results, _ = search_files(
        trained, index, gallery, [gallery / "g.webp", gallery / "birds/d.png"], "sa+glca"
    )
    for result in results:
        assert result.matches[0].path == result.query
        assert result.matches[0].similarity == pytest.approx(1.0, abs=1e-5)


@pytest.fixture(scope="module")
def script():
    """search.py as a module, to call its main() in-process."""
    spec = importlib.util.spec_from_file_location("search_script", ROOT / "search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_search_script_prints_writes_csv_and_picture(script, fgvc_checkpoint, gallery, tmp_path, capsys):
    csv, picture, index = tmp_path / "out.csv", tmp_path / "out.png", tmp_path / "index.npz"
    argv = [
        "--checkpoint", str(fgvc_checkpoint), "--gallery", str(gallery),
        "--query", str(gallery / "a.jpg"), str(gallery / "birds/d.png"), str(gallery / "corrupt.jpg"),
        str(tmp_path / "missing.jpg"), "--top", "3", "--index", str(index), "--csv", str(csv),
        "--picture", str(picture), "--batch-size", "4", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    assert (
        f"index {index}: 7 images (0 reused, 7 embedded, 0 removed); built from scratch: no index yet" in out
    )
    assert "skipped 1 gallery file(s):" in out and "skipped 2 query input(s):" in out
    assert f"{tmp_path / 'missing.jpg'}: no such file or folder" in out and "cannot decode image" in out
    assert f"    1  1.0000  {gallery / 'a.jpg'}" in out
    assert not (gallery / INDEX_NAME).exists()
    frame = pd.read_csv(csv)
    assert list(frame.columns) == ["query", "rank", "path", "similarity"]
    assert frame["rank"].tolist() == [1, 2, 3, 1, 2, 3]
    assert frame["path"][0] == str(gallery / "a.jpg") and frame["path"][3] == str(gallery / "birds/d.png")
    assert frame["similarity"][[0, 3]].tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    with Image.open(picture) as image:
        assert image.size == search_figure_size(2, 3)

    assert script.main(argv) == 0  # the second call reuses the whole index
    assert f"index {index}: 7 images (7 reused, 0 embedded, 0 removed)\n" in capsys.readouterr().out


def test_search_script_exit_codes(script, fgvc_checkpoint, gallery, tmp_path, capsys):
    common = ["--checkpoint", str(fgvc_checkpoint), "--gallery", str(gallery), "--no-progress"]
    assert script.main([*common, "--query", str(gallery / "corrupt.jpg")]) == 1
    assert "error: nothing was searched: no query image could be read" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert script.main([*common[:2], "--gallery", str(empty), "--query", str(gallery / "a.jpg")]) == 1
    captured = capsys.readouterr()
    assert "no gallery image could be embedded" in captured.err and "folder holds no" in captured.out
    assert script.main([*common, "--query", str(gallery / "a.jpg"), "--top", "0"]) == 1
    assert "error: --top and --batch-size must be >= 1" in capsys.readouterr().err
    missing = ["--checkpoint", str(tmp_path / "none.pt"), "--gallery", str(gallery), "--query", "a.jpg"]
    assert script.main(missing) == 1
    assert "error: no checkpoint at" in capsys.readouterr().err
    assert script.main([*common[:2], "--gallery", str(tmp_path / "nowhere"), "--query", "a.jpg"]) == 1
    assert "is not a folder" in capsys.readouterr().err
