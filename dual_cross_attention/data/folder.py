"""Users' own data: one folder per class under train/, test/ and optionally val/."""

from __future__ import annotations

from pathlib import Path

from .base import ImageDataset, format_tree, require_exists
from .errors import DatasetLayoutError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
FOLDER_SPLITS = ("train", "val", "test")
FOLDER_TREE = format_tree(
    "folder",
    """
root/
  train/<class name>/*.jpg      (also .jpeg .png .bmp .webp .tif .tiff .gif)
  test/<class name>/*.jpg
  val/<class name>/*.jpg        optional
Classes are the folder names under train/, sorted by name; label = index in that order.
""",
)


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted((d for d in split_dir.iterdir() if d.is_dir()), key=lambda d: d.name)


def _images_in(class_dir: Path) -> list[Path]:
    return sorted(p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def folder_classes(root: Path) -> list[str]:
    """Class names: the sub-folders of ``root/train``, sorted, so every split agrees on labels."""
    train_dir = require_exists(root / "train", FOLDER_TREE, "class list folder")
    classes = [d.name for d in _class_dirs(train_dir)]
    if not classes:
        raise DatasetLayoutError(f"{train_dir} has no class folders\n{FOLDER_TREE}")
    return classes


def load_folder(root: Path, split: str, description: str = "folder") -> ImageDataset:
    """The images under ``root/<split>/<class>/``; labels follow the sorted class folders of train/."""
    if split not in FOLDER_SPLITS:
        raise ValueError(f"{description} has splits {FOLDER_SPLITS}, got {split!r}")
    require_exists(root, FOLDER_TREE, "dataset root")
    classes = folder_classes(root)
    label_of = {name: i for i, name in enumerate(classes)}
    split_dir = require_exists(root / split, FOLDER_TREE, "split folder")
    samples, targets = [], []
    for class_dir in _class_dirs(split_dir):
        if class_dir.name not in label_of:
            raise DatasetLayoutError(
                f"{class_dir} is a class that {root / 'train'} does not have; every split must use "
                f"the class folders of train/\n{FOLDER_TREE}"
            )
        images = _images_in(class_dir)
        if not images and split == "train":
            raise DatasetLayoutError(f"{class_dir} holds no images\n{FOLDER_TREE}")
        samples += images
        targets += [label_of[class_dir.name]] * len(images)
    if not samples:
        raise DatasetLayoutError(f"{split_dir} holds no images in class folders\n{FOLDER_TREE}")
    return ImageDataset(samples, targets, classes, description=f"{description} {split}")
