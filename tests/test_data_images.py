"""Decoding to RGB once (grayscale, CMYK, RGBA, palette) and corrupt-image handling."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from data_helpers import make_folder
from PIL import Image

from dual_cross_attention.data import CorruptImageError, build_dataset, load_rgb


def test_rgb_jpeg_is_unchanged(tmp_path):
    pixels = np.zeros((6, 8, 3), dtype=np.uint8)
    pixels[:, :4] = (250, 10, 10)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_rgb(tmp_path / "a.png"), pixels)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    Image.new("L", (8, 6), 77).save(tmp_path / "gray.jpg")
    image = load_rgb(tmp_path / "gray.jpg")
    assert image.shape == (6, 8, 3) and image.dtype == np.uint8
    assert np.all(image == 77)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    image = load_rgb(tmp_path / "cmyk.jpg")
    assert image.shape == (8, 8, 3)
    np.testing.assert_allclose(image.reshape(-1, 3).mean(0), [255, 0, 0], atol=3)


def test_rgba_drops_alpha(tmp_path):
    Image.new("RGBA", (5, 4), (10, 20, 30, 128)).save(tmp_path / "rgba.png")
    image = load_rgb(tmp_path / "rgba.png")
    assert image.shape == (4, 5, 3)
    assert np.all(image == [10, 20, 30])


def test_palette_with_transparency(tmp_path):
    palette_image = Image.new("P", (4, 4), 1)
    palette_image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette_image.save(tmp_path / "p.png", transparency=0)
    assert np.all(load_rgb(tmp_path / "p.png") == [200, 100, 50])


def _corrupt(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_corrupt_image_error_names_file(tmp_path):
    make_folder(tmp_path, {"train": {"a": 2, "b": 2}})
    bad = tmp_path / "train" / "b" / "001.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    dataset = build_dataset("folder", tmp_path, "train")
    assert dataset[0][1] == 0
    with pytest.raises(CorruptImageError, match=str(bad)):
        dataset[3]


def test_truncated_jpeg_is_corrupt(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "t.jpg")
    _corrupt(tmp_path / "t.jpg")
    with pytest.raises(CorruptImageError, match="truncated"):
        load_rgb(tmp_path / "t.jpg")


def test_skip_corrupt_drops_counts_and_reports_once(tmp_path, caplog):
    make_folder(tmp_path, {"train": {"a": 3, "b": 2}})
    (tmp_path / "train" / "a" / "001.jpg").write_bytes(b"junk")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        tmp_path / "train" / "b" / "000.jpg"
    )
    _corrupt(tmp_path / "train" / "b" / "000.jpg")
    with caplog.at_level(logging.WARNING, logger="dual_cross_attention.data"):
        dataset = build_dataset("folder", tmp_path, "train", skip_corrupt=True)
    assert len(dataset) == 3
    assert dataset.targets == [0, 0, 1]
    assert [p.name for p in dataset.samples] == ["000.jpg", "002.jpg", "001.jpg"]
    assert sorted(p.name for p, _ in dataset.skipped) == ["000.jpg", "001.jpg"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 2 corrupt image(s) of 5" in warnings[0].getMessage()
    assert str(tmp_path / "train" / "a" / "001.jpg") in warnings[0].getMessage()
    assert all(dataset[i][0].shape == (16, 20, 3) for i in range(len(dataset)))
