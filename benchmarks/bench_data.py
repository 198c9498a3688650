"""Images/s of one data-loading worker through the 448 px training pipeline (target: more than 100).

Writes CUB-sized JPEGs (500x375, photo-like content, about the file size of CUB's images) into a
temporary folder dataset, then times ``dataset[i]`` (decode to RGB + resize 550 + random crop 448
+ flip + normalize + to tensor) in a single process with one torch and one OpenCV thread, which
is what a DataLoader worker gets. Target: more than 100 images/s per worker.

    python benchmarks/bench_data.py [--images 64] [--passes 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from dual_cross_attention.data import build_dataset, build_train_transform

TARGET_PER_WORKER = 100.0
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photo_like(rng: np.random.Generator, height: int = 375, width: int = 500) -> np.ndarray:
    """Smooth colour fields plus fine texture: compresses like a photo, unlike pure noise."""
    small = rng.integers(0, 256, (height // 25, width // 25, 3), dtype=np.uint8)
    smooth = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    texture = cv2.GaussianBlur(rng.normal(0.0, 25.0, (height, width, 3)).astype(np.float32), (0, 0), 0.8)
    return np.clip(smooth + texture, 0, 255).astype(np.uint8)


def write_images(root: Path, count: int) -> float:
    """Write ``count`` JPEGs as a two-class folder dataset; returns the mean file size in KB."""
    rng = np.random.default_rng(0)
    sizes = []
    for i in range(count):
        path = root / "train" / f"class_{i % 2}" / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo_like(rng)).save(path, quality=95)
        sizes.append(path.stat().st_size)
    return float(np.mean(sizes)) / 1024


def time_pipeline(root: Path, passes: int) -> tuple[float, float]:
    """(images/s through dataset[i] with the full pipeline, images/s of decoding alone)."""
    pipeline = build_train_transform(448, 550, IMAGENET_MEAN, IMAGENET_STD, seed=0)
    dataset = build_dataset("folder", root, "train", transform=pipeline)
    for i in range(min(8, len(dataset))):  # warm up caches and lazy imports
        dataset[i]
    start = time.perf_counter()
    for _ in range(passes):
        for i in range(len(dataset)):
            image, _ = dataset[i]
            assert image.shape == (3, 448, 448)
    full = passes * len(dataset) / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset.load_image(i)
    decode = len(dataset) / (time.perf_counter() - start)
    return full, decode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="JPEGs to generate")
    parser.add_argument("--passes", type=int, default=3, help="timed passes over them")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        mean_kb = write_images(Path(tmp), args.images)
        full, decode = time_pipeline(Path(tmp), args.passes)
    print(f"{args.images} JPEGs of 500x375 px, mean {mean_kb:.0f} KB; one worker (1 torch + 1 OpenCV thread)")
    print(f"decode to RGB only:            {decode:7.1f} images/s")
    print(
        f"train pipeline 550 -> 448 px:  {full:7.1f} images/s per worker (target > {TARGET_PER_WORKER:.0f})"
    )
    return 0 if full > TARGET_PER_WORKER else 1


if __name__ == "__main__":
    sys.exit(main())
