"""Albumentations pipelines for training and evaluation (the paper: resize 550, random crop 448, flip).

Train: resize to ``resize_size`` -> random crop ``img_size`` -> horizontal flip -> normalize ->
tensor. Eval: resize -> center crop -> normalize -> tensor. The mean/std are arguments, never
looked up implicitly: they must match the backbone's pretraining, and a silent ImageNet default
would quietly hurt a backbone trained with other statistics. ``mean_std_from_model`` reads
them from a timm model's ``pretrained_cfg`` for callers that want that.

Datasets hand the pipeline an RGB HWC uint8 array decoded once (see ``image_io.load_rgb``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import get_worker_info

MeanStd = tuple[tuple[float, float, float], tuple[float, float, float]]


class ImagePipeline:
    """An albumentations ``Compose`` called as ``pipeline(image) -> CHW float tensor``.

    Albumentations keeps its own random generator inside the ``Compose``. DataLoader workers
    are forked copies, so without care every worker would replay the same crops and flips, and
    runs would not be reproducible. The pipeline therefore reseeds itself the first time it
    runs in each worker from ``worker_info.seed`` (which PyTorch derives from the global torch
    seed, per worker and per epoch), and in the main process from ``seed`` or, if that is None,
    from ``torch.initial_seed()``.

    Args:
        compose: the albumentations pipeline; it must end with ``ToTensorV2``.
        seed: seed for use outside DataLoader workers; None uses ``torch.initial_seed()``.
    """

    def __init__(self, compose: A.Compose, seed: int | None = None) -> None:
        self.compose = compose
        self.seed = seed
        self._seeded_for: tuple[int, int] | None = None

    def _reseed_if_needed(self) -> None:
        info = get_worker_info()
        if info is not None:
            key, seed = (os.getpid(), info.seed), info.seed
        else:
            # Keyed on the seed too: a trainer that reseeds torch at each epoch start gets a fresh,
            # reproducible augmentation stream per epoch (what exact resume relies on).
            seed = torch.initial_seed() if self.seed is None else self.seed
            key = (os.getpid(), seed)
        if key != self._seeded_for:
            self.compose.set_random_seed(seed % 2**32)
            self._seeded_for = key

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"expected an RGB image as an HxWx3 uint8 array, got shape {image.shape} dtype {image.dtype}"
            )
        self._reseed_if_needed()
        return self.compose(image=image)["image"]

    def __repr__(self) -> str:
        steps = ", ".join(type(t).__name__ for t in self.compose.transforms)
        return f"ImagePipeline({steps})"


def _check_sizes(img_size: int, resize_size: int) -> None:
    if img_size < 1 or resize_size < img_size:
        raise ValueError(
            f"need 1 <= img_size <= resize_size, got img_size={img_size}, resize_size={resize_size}"
        )


def _normalize(mean: Sequence[float], std: Sequence[float]) -> A.Normalize:
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need 3 values each and std > 0, got mean={mean}, std={std}")
    # max_pixel_value=255: mean/std are given on the 0-1 scale as in timm's pretrained_cfg.
    return A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0)


def build_train_transform(
    img_size: int,
    resize_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    hflip: bool = True,
    seed: int | None = None,
) -> ImagePipeline:
    """Resize to a ``resize_size`` square, random-crop ``img_size``, flip, normalize.

    Args:
        img_size: side of the square crop fed to the model (448 in the paper).
        resize_size: side of the square the image is resized to first (550 in the paper).
            Equal to ``img_size`` means no random crop (the demo uses this to keep its detail on
            the patch grid).
        mean: per-channel mean on the 0-1 scale (RGB), e.g. from ``mean_std_from_model``.
        std: per-channel standard deviation on the 0-1 scale (RGB).
        hflip: apply a random horizontal flip with probability 0.5.
        seed: see ``ImagePipeline``.
    """
    _check_sizes(img_size, resize_size)
    steps: list[Any] = [
        A.Resize(resize_size, resize_size, interpolation=cv2.INTER_LINEAR),
        A.RandomCrop(img_size, img_size),
    ]
    if hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    steps += [_normalize(mean, std), ToTensorV2()]
    return ImagePipeline(A.Compose(steps), seed=seed)


def build_eval_transform(
    img_size: int, resize_size: int, mean: Sequence[float], std: Sequence[float]
) -> ImagePipeline:
    """Resize to a ``resize_size`` square, center-crop ``img_size``, normalize (deterministic).

    Args: as ``build_train_transform``.
    """
    _check_sizes(img_size, resize_size)
    steps = [
        A.Resize(resize_size, resize_size, interpolation=cv2.INTER_LINEAR),
        A.CenterCrop(img_size, img_size),
        _normalize(mean, std),
        ToTensorV2(),
    ]
    return ImagePipeline(A.Compose(steps), seed=0)


def build_transforms(
    img_size: int, resize_size: int, mean: Sequence[float], std: Sequence[float], hflip: bool = True
) -> tuple[ImagePipeline, ImagePipeline]:
    """The (train, eval) pair with the same sizes and normalization."""
    return (
        build_train_transform(img_size, resize_size, mean, std, hflip=hflip),
        build_eval_transform(img_size, resize_size, mean, std),
    )


def mean_std_from_model(model: torch.nn.Module) -> MeanStd:
    """The normalization a timm model was pretrained with, from its ``pretrained_cfg``.

    Looks at ``model.pretrained_cfg`` and, for wrappers, at ``model.backbone.pretrained_cfg``.
    Raises instead of guessing when neither holds a mean and std.
    """
    for candidate in (model, getattr(model, "backbone", None)):
        cfg = getattr(candidate, "pretrained_cfg", None)
        if isinstance(cfg, dict) and "mean" in cfg and "std" in cfg:
            mean, std = tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
            if len(mean) != 3 or len(std) != 3:
                raise ValueError(f"pretrained_cfg mean/std must have 3 values, got {mean}, {std}")
            return (mean[0], mean[1], mean[2]), (std[0], std[1], std[2])
    raise ValueError(
        f"{type(model).__name__} has no pretrained_cfg with 'mean' and 'std' (checked the model and "
        f"model.backbone); pass mean and std explicitly"
    )
