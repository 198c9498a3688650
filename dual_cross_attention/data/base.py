"""The dataset class every loader returns, and the checks they share.

Loaders (cub.py, cars.py, ...) only parse their annotation files into (paths, labels, class
names); everything that happens per image lives here once: decoding to RGB, the
dataset-specific crop, the transform, and the checks for missing and corrupt files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from .errors import DataError, DatasetLayoutError
from .image_io import find_corrupt, load_rgb

logger = logging.getLogger(__name__)

Transform = Callable[[np.ndarray], Any]
MAX_LISTED = 5  # how many offending files an error message lists before "... and N more"


@dataclass(frozen=True)
class BottomCrop:
    """Remove the bottom ``pixels`` rows (FGVC-Aircraft's copyright banner). Picklable for workers."""

    pixels: int

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if image.shape[0] <= self.pixels:
            raise ValueError(f"image of height {image.shape[0]} is too small to crop {self.pixels} rows")
        return image[: image.shape[0] - self.pixels]


def warn_skipped(description: str, bad: Sequence[tuple[Path, str]], total: int) -> None:
    """One warning for the corrupt images a dataset dropped (``skip_corrupt``), the first
    ``MAX_LISTED`` named with their reason."""
    listed = "\n  ".join(f"{path}: {reason}" for path, reason in bad[:MAX_LISTED])
    more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    logger.warning(
        "%s: skipped %d corrupt image(s) of %d (skip_corrupt=True):\n  %s%s", description, len(bad), total,
        listed, more,
    )  # fmt: skip


class ImageDataset(Dataset):
    """Images with integer labels: ``samples``, ``targets``, ``classes`` as in torchvision.

    ``__getitem__`` returns (transform(image), label) where image is the decoded RGB picture as
    an (H, W, 3) uint8 array after the dataset-specific crop; with ``transform=None`` that array
    itself.

    Args:
        samples: image paths.
        targets: 0-based labels, one per sample.
        classes: class names; index = label.
        transform: callable applied to the RGB array (see ``transforms.build_train_transform``).
        crop: dataset-specific crop applied before the transform (e.g. ``BottomCrop(20)``).
        description: short name used in log and error messages, e.g. ``"cub train"``.
    """

    def __init__(
        self,
        samples: Sequence[Path],
        targets: Sequence[int],
        classes: Sequence[str],
        transform: Transform | None = None,
        crop: Callable[[np.ndarray], np.ndarray] | None = None,
        description: str = "dataset",
    ) -> None:
        if len(samples) != len(targets):
            raise ValueError(f"{description}: {len(samples)} samples but {len(targets)} targets")
        bad = [t for t in targets if not 0 <= t < len(classes)]
        if bad:
            raise ValueError(
                f"{description}: labels {sorted(set(bad))[:MAX_LISTED]} outside [0, {len(classes)})"
            )
        self.samples = [Path(p) for p in samples]
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self.transform = transform
        self.crop = crop
        self.description = description
        self.skipped: list[tuple[Path, str]] = []

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> np.ndarray:
        """The RGB array of sample ``index`` after the dataset-specific crop, before the transform."""
        path = self.samples[index]
        image = load_rgb(path)
        if self.crop is None:
            return image
        try:
            return self.crop(image)
        except ValueError as err:
            raise DataError(f"cannot crop {path}: {err}") from err

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.load_image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

    def subset(self, indices: Sequence[int], transform: Transform | None, description: str) -> ImageDataset:
        """A dataset over ``indices`` with the same classes and crop and its own transform."""
        part = ImageDataset(
            [self.samples[i] for i in indices],
            [self.targets[i] for i in indices],
            self.classes,
            transform=transform,
            crop=self.crop,
            description=description,
        )
        part.skipped = self.skipped
        return part

    def drop_corrupt(self) -> None:
        """Decode every image once and drop those that fail, reporting them in one warning.

        Used for ``skip_corrupt=True``: scanning up front keeps ``len()`` honest and gives one
        report, instead of substituting other samples at load time in every worker.
        """
        bad = find_corrupt(self.samples)
        if not bad:
            return
        bad_paths = {path for path, _ in bad}
        keep = [i for i, path in enumerate(self.samples) if path not in bad_paths]
        self.samples = [self.samples[i] for i in keep]
        self.targets = [self.targets[i] for i in keep]
        self.skipped = bad
        warn_skipped(self.description, bad, len(bad) + len(keep))

    def __repr__(self) -> str:
        return f"ImageDataset({self.description}: {len(self)} images, {len(self.classes)} classes)"


def require_exists(path: Path, tree: str, what: str = "") -> Path:
    """Return ``path`` if it exists, else raise a DatasetLayoutError naming it and the expected tree."""
    if not path.exists():
        raise DatasetLayoutError(f"missing {what or 'path'} {path}\n{tree}")
    return path


def require_images_exist(samples: Sequence[Path], label_file: Path | str, tree: str) -> None:
    """Raise if a label file references images that are not on disk, naming both."""
    missing = [p for p in samples if not os.path.isfile(p)]
    if not missing:
        return
    listed = "\n  ".join(str(p) for p in missing[:MAX_LISTED])
    more = f"\n  ... and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
    raise DatasetLayoutError(
        f"{label_file} references {len(missing)} image(s) that do not exist:\n  {listed}{more}\n"
        f"Check that the images were extracted next to the annotation files.\n{tree}"
    )


def read_id_file(path: Path, tree: str) -> list[tuple[str, str]]:
    """Parse a '<id> <value>' text file (CUB, Aircraft) into pairs, splitting on the first space.

    Values may contain spaces (Aircraft variants such as 'Cessna 172'); blank lines are ignored.
    """
    require_exists(path, tree, "file")
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        key, sep, value = line.partition(" ")
        if not sep or not value.strip():
            raise DatasetLayoutError(f"{path}:{number}: expected '<id> <value>', got {line!r}\n{tree}")
        pairs.append((key, value.strip()))
    return pairs


def format_tree(title: str, body: str) -> str:
    """The 'Expected layout' block appended to layout errors."""
    tree = body.strip("\n").rstrip()
    return f"Expected layout for {title}:\n{tree}"
