"""Albumentations pipelines for Re-ID (the BoT recipe): non-square resize, flip, pad+crop, erasing.

Train: resize to (H, W) -> horizontal flip -> pad 10 px with zeros -> random crop (H, W) ->
normalize -> random erasing -> tensor. Eval: resize -> normalize -> tensor. Sizes are (height,
width), e.g. 256x128 for people. As in ``transforms``, mean/std are always passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from ..errors import UsageError
from .transforms import ImagePipeline, _normalize

ImageSize = tuple[int, int]  # (height, width)


def parse_reid_size(value: str | int | Sequence[int]) -> ImageSize:
    """(height, width) from '256x128', a single int (square) or a (height, width) pair."""
    if isinstance(value, str):
        height, sep, width = value.lower().partition("x")
        if not sep or not height.strip().isdigit() or not width.strip().isdigit():
            raise UsageError(f"a Re-ID image size is 'HEIGHTxWIDTH', e.g. '256x128', got {value!r}")
        size = (int(height), int(width))
    elif isinstance(value, int) and not isinstance(value, bool):
        size = (value, value)
    elif isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        size = (int(value[0]), int(value[1]))
    else:
        raise UsageError(f"a Re-ID image size is 'HEIGHTxWIDTH', an int or (height, width), got {value!r}")
    if min(size) < 1:
        raise UsageError(f"Re-ID image size must be positive, got {size[0]}x{size[1]}")
    return size


def build_reid_train_transform(
    img_size: str | int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    hflip: bool = True,
    pad: int = 10,
    erasing_p: float = 0.5,
    seed: int | None = None,
) -> ImagePipeline:
    """The BoT training augmentation at ``img_size`` (height x width).

    Args:
        img_size: '256x128', (256, 128) or a single int for a square.
        mean: per-channel mean on the 0-1 scale (RGB), from the backbone's pretraining.
        std: per-channel standard deviation on the 0-1 scale (RGB).
        hflip: random horizontal flip with probability 0.5.
        pad: zero padding on each side before cropping back to ``img_size`` (0: no pad+crop).
        erasing_p: probability of random erasing (area 2-40 %, aspect 0.3-3.3, as in BoT).
        seed: see ``transforms.ImagePipeline``.
    """
    height, width = parse_reid_size(img_size)
    if pad < 0 or not 0.0 <= erasing_p <= 1.0:
        raise UsageError(f"need pad >= 0 and 0 <= erasing_p <= 1, got pad={pad}, erasing_p={erasing_p}")
    steps: list[Any] = [A.Resize(height, width, interpolation=cv2.INTER_LINEAR)]
    if hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    if pad:
        steps += [A.Pad(padding=pad, fill=0, border_mode=cv2.BORDER_CONSTANT), A.RandomCrop(height, width)]
    steps.append(_normalize(mean, std))
    if erasing_p:
        # After normalizing, fill 0 is the mean colour: BoT erases with the mean, not with black.
        steps.append(A.Erasing(scale=(0.02, 0.4), ratio=(0.3, 3.3), fill=0, p=erasing_p))
    steps.append(ToTensorV2())
    return ImagePipeline(A.Compose(steps), seed=seed)


def build_reid_eval_transform(
    img_size: str | int | Sequence[int], mean: Sequence[float], std: Sequence[float]
) -> ImagePipeline:
    """Resize to ``img_size`` (height x width) and normalize (deterministic). Args as for training."""
    height, width = parse_reid_size(img_size)
    steps = [A.Resize(height, width, interpolation=cv2.INTER_LINEAR), _normalize(mean, std), ToTensorV2()]
    return ImagePipeline(A.Compose(steps), seed=0)


def build_reid_transforms(
    img_size: str | int | Sequence[int], mean: Sequence[float], std: Sequence[float]
) -> tuple[ImagePipeline, ImagePipeline]:
    """The (train, eval) pair with the same size and normalization."""
    return build_reid_train_transform(img_size, mean, std), build_reid_eval_transform(img_size, mean, std)
