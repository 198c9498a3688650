"""``build_dataset``: one entry point from (name, root, split, options) to a dataset.

Each dataset lives in its own module (cub.py, cars.py, aircraft.py, folder.py, synthetic.py,
synthetic_hard.py);
this module only dispatches, checks options, and applies what is common to all of them: the
optional validation carve-out (``val_fraction``) and ``skip_corrupt``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .aircraft import AIRCRAFT_SPLITS, AIRCRAFT_TREE, load_aircraft
from .base import ImageDataset, Transform
from .cars import ALL_TREES as CARS_TREE
from .cars import CARS_SPLITS, load_cars
from .cub import CUB_SPLITS, CUB_TREE, load_cub
from .errors import DatasetLayoutError
from .folder import FOLDER_SPLITS, FOLDER_TREE, load_folder
from .splits import stratified_split
from .synthetic import DEFAULT_DEMO_ROOT, DemoSpec, generate_demo_dataset
from .synthetic_hard import DEFAULT_HARD_ROOT, HardSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetEntry:
    """How to load one named dataset."""

    load: Callable[..., ImageDataset]  # (root, split, **options) -> ImageDataset
    splits: tuple[str, ...]
    options: tuple[str, ...]
    tree: str
    train_split: str = "train"  # the split training uses, and that val_fraction carves from
    generated_into: Path | None = None  # a generated set: its default root (need not exist yet)


def _load_synthetic(root: Path, split: str, **spec: Any) -> ImageDataset:
    """Generate the demo set on first use (CUB layout), then read it with the CUB loader."""
    generate_demo_dataset(root, DemoSpec(**spec))
    return load_cub(root, split, description="synthetic")


def _load_synthetic_hard(root: Path, split: str, **spec: Any) -> ImageDataset:
    """Generate the hard demo set on first use (CUB layout), then read it with the CUB loader."""
    generate_demo_dataset(root, HardSpec(**spec))
    return load_cub(root, split, description="synthetic-hard")


def _spec_options(spec: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(spec) if f.name != "version")


DATASETS: dict[str, DatasetEntry] = {
    "cub": DatasetEntry(load_cub, CUB_SPLITS, (), CUB_TREE),
    "cars": DatasetEntry(load_cars, CARS_SPLITS, ("layout",), CARS_TREE),
    "aircraft": DatasetEntry(
        load_aircraft, AIRCRAFT_SPLITS, ("level", "crop_banner"), AIRCRAFT_TREE, train_split="trainval"
    ),
    "folder": DatasetEntry(load_folder, FOLDER_SPLITS, (), FOLDER_TREE),
    "synthetic": DatasetEntry(
        _load_synthetic,
        CUB_SPLITS,
        _spec_options(DemoSpec),
        "the demo set is generated automatically (CUB layout)",
        generated_into=DEFAULT_DEMO_ROOT,
    ),
    "synthetic-hard": DatasetEntry(
        _load_synthetic_hard,
        CUB_SPLITS,
        _spec_options(HardSpec),
        "the hard demo set is generated automatically (CUB layout)",
        generated_into=DEFAULT_HARD_ROOT,
    ),
}


def _entry(name: str) -> DatasetEntry:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {sorted(DATASETS)}")
    return DATASETS[name]


def default_train_split(name: str) -> str:
    """The split training uses: 'trainval' for aircraft, 'train' for the others."""
    return _entry(name).train_split


def _resolve_root(name: str, root: str | os.PathLike[str] | None, entry: DatasetEntry) -> Path:
    if root is None:
        if entry.generated_into is None:
            raise ValueError(f"dataset {name!r} needs a root folder")
        return entry.generated_into
    path = Path(root).expanduser()
    if entry.generated_into is None and not path.exists():
        raise DatasetLayoutError(f"dataset root {path} does not exist\n{entry.tree}")
    return path


def _load(
    name: str, root: str | os.PathLike[str] | None, split: str, skip_corrupt: bool, options: dict[str, Any]
) -> ImageDataset:
    """Load one split without transform, after checking options and the split name."""
    entry = _entry(name)
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for dataset {name!r}; valid options: {list(entry.options)}"
        )
    if split not in entry.splits:
        raise ValueError(f"dataset {name!r} has splits {list(entry.splits)}, got {split!r}")
    dataset = entry.load(_resolve_root(name, root, entry), split, **options)
    if skip_corrupt:
        dataset.drop_corrupt()
    return dataset


def _has_native_val(name: str, root: str | os.PathLike[str] | None, train_split: str) -> bool:
    """Whether the dataset ships its own val split that a carve-out would silently ignore."""
    if name == "aircraft":
        return train_split == "train"
    return name == "folder" and root is not None and (Path(root) / "val").is_dir()


def _check_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")


def carve(
    full: ImageDataset, part: str, val_fraction: float, val_seed: int, transform: Transform | None
) -> ImageDataset:
    """The 'train' or 'val' part of ``full`` after a stratified, seeded ``val_fraction`` split."""
    train_idx, val_idx = stratified_split(full.targets, val_fraction, val_seed)
    indices = train_idx if part == "train" else val_idx
    description = f"{full.description} [{part} part, val_fraction={val_fraction}, seed={val_seed}]"
    return full.subset(indices, transform, description)


def build_dataset(
    name: str,
    root: str | os.PathLike[str] | None,
    split: str,
    transform: Transform | None = None,
    *,
    val_fraction: float = 0.0,
    val_seed: int = 0,
    skip_corrupt: bool = False,
    **options: Any,
) -> ImageDataset:
    """Load split ``split`` of dataset ``name`` from ``root``.

    Args:
        name: 'cub', 'cars', 'aircraft', 'folder', 'synthetic' or 'synthetic-hard'.
        root: the dataset folder (see each module's expected tree); for 'synthetic' and
            'synthetic-hard', where the set is generated on first use (None: ``data/demo``,
            ``data/demo_hard``).
        split: 'train' or 'test'; aircraft also has 'val' and 'trainval', folder has 'val' if
            ``root/val`` exists. With ``val_fraction > 0``, 'train' and 'val' are the two parts
            of the dataset's training split (aircraft: 'trainval').
        transform: callable applied to the decoded RGB (H, W, 3) uint8 array; None returns it.
        val_fraction: share of each class of the training split held out as 'val'.
        val_seed: seed of that split; the same seed gives the same split everywhere.
        skip_corrupt: decode every image up front and drop unreadable ones, reporting them once;
            by default an unreadable image raises a CorruptImageError naming the file.
        **options: dataset options: cars ``layout``; aircraft ``level`` ('variant', 'family',
            'manufacturer') and ``crop_banner``; synthetic the ``DemoSpec`` fields,
            synthetic-hard the ``HardSpec`` fields.

    Returns:
        An ``ImageDataset`` with ``classes``, ``targets`` (0-based) and ``samples``.

    Raises:
        DatasetLayoutError: a missing root, annotation file or image (naming the path and
            printing the expected tree), or a malformed annotation file.
        ValueError: an unknown name, split or option.
    """
    _check_fraction(val_fraction)
    if val_fraction == 0.0:
        dataset = _load(name, root, split, skip_corrupt, options)
        dataset.transform = transform
        return dataset
    if split == "test":
        return build_dataset(name, root, split, transform, skip_corrupt=skip_corrupt, **options)
    if split not in ("train", "val"):
        raise ValueError(f"with val_fraction > 0 the splits are 'train', 'val' and 'test', got {split!r}")
    train_split = default_train_split(name)
    if _has_native_val(name, root, train_split):
        raise ValueError(f"dataset {name!r} at {root} has its own 'val' split; use it with val_fraction=0")
    full = _load(name, root, train_split, skip_corrupt, options)
    return carve(full, split, val_fraction, val_seed, transform)


@dataclass
class DatasetSplits:
    """The datasets one training run uses; ``val`` is None when there is no validation set."""

    train: ImageDataset
    val: ImageDataset | None
    test: ImageDataset


def build_splits(
    name: str,
    root: str | os.PathLike[str] | None,
    train_transform: Transform | None,
    eval_transform: Transform | None,
    *,
    val_fraction: float = 0.0,
    val_seed: int = 0,
    skip_corrupt: bool = False,
    **options: Any,
) -> DatasetSplits:
    """Train, val and test datasets as a training run wants them.

    Train is the dataset's training split ('trainval' for aircraft). Val is carved out of it
    when ``val_fraction > 0``, is the dataset's own val split for a folder dataset with a
    ``val/`` folder, and is None otherwise. The training split is read (and, with
    ``skip_corrupt``, scanned) once.

    Args: as ``build_dataset``.
    """
    _check_fraction(val_fraction)
    train_split = default_train_split(name)
    full = _load(name, root, train_split, skip_corrupt, options)
    if val_fraction > 0.0:
        if _has_native_val(name, root, train_split):
            raise UsageError(
                f"dataset {name!r} at {root} has its own 'val' split; use it with val_fraction=0"
            )
        train = carve(full, "train", val_fraction, val_seed, train_transform)
        val: ImageDataset | None = carve(full, "val", val_fraction, val_seed, eval_transform)
    else:
        full.transform = train_transform
        train, val = full, None
        if _has_native_val(name, root, train_split):
            val = build_dataset(name, root, "val", eval_transform, skip_corrupt=skip_corrupt, **options)
    test = build_dataset(name, root, "test", eval_transform, skip_corrupt=skip_corrupt, **options)
    logger.info("Datasets: train %s, val %s, test %s", train, val, test)
    return DatasetSplits(train=train, val=val, test=test)
