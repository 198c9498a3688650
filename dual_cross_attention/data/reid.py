"""Object re-identification data: train/query/gallery records and the dataset that reads them.

``load_reid_splits(name, root, **options)`` reads one of the layouts of ``reid_layouts`` into
``ReIDSplits``; ``ReIDDataset`` turns a list of records into a torch dataset.

Conventions, the same for every layout:

* ``pid`` is the dataset's own identity id (for ``reid_folder``, the index of the identity
  folder name in ``ReIDSplits.identity_names``). Training records also carry ``label``, the
  rank of their pid among the sorted training pids (0..C-1), which is what the classifier
  learns; query and gallery records have ``label == pid``.
* ``camid`` is 0-based: the 1-based camera number in the file name minus one. ``-1`` means the
  camera is unknown; then ``ReIDSplits.has_cameras`` is False.
* Evaluation (standard protocol): for each query, leave out of its gallery every entry with the
  same pid *and* the same camid. Without cameras (``has_cameras=False``) leave out only gallery
  entries that are the query's own file (same path) and keep every other same-identity match.
  Junk (pid -1) is already left out of the gallery; distractors (pid 0 in Market-1501 and
  DukeMTMC-reID) are in it as ordinary non-matches.
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

from ..errors import UsageError
from .base import Transform, require_exists, warn_skipped
from .image_io import find_corrupt, load_rgb
from .reid_layouts import (
    DUKE_TREE,
    MARKET_TREE,
    MSMT_TREE,
    REID_FOLDER_TREE,
    VERI_TREE,
    Entry,
    ParsedReID,
    parse_dukemtmc,
    parse_market1501,
    parse_msmt17,
    parse_reid_folder,
    parse_veri776,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReIDRecord:
    """One image: its path, the dataset's identity id, its 0-based camera (-1: unknown), its label.

    ``label`` is the training class (0..C-1) for training records and equals ``pid`` for query
    and gallery records.
    """

    path: Path
    pid: int
    camid: int
    label: int


@dataclass(frozen=True)
class ReIDSplits:
    """The three parts of a Re-ID dataset, as ``load_reid_splits`` returns them.

    Attributes:
        dataset: the layout name, e.g. 'market1501'.
        root: the folder the images were read from (after resolving a parent folder).
        train: training records, labels 0..num_train_ids-1 in sorted order of the original pids.
        query: query records (label == pid).
        gallery: gallery records (label == pid), junk left out, distractors kept.
        num_train_ids: number of training identities (the classifier's width).
        version: the dataset version where there are several ('MSMT17_V1', 'MSMT17_V2'), else ''.
        has_cameras: False when camids are unknown (all -1); see the module docstring for what
            evaluation must then do.
        identity_names: for 'reid_folder', the identity folder names (index = pid); else empty.
        left_out: images dropped on purpose (junk anywhere, distractors in train and query).
    """

    dataset: str
    root: Path
    train: tuple[ReIDRecord, ...]
    query: tuple[ReIDRecord, ...]
    gallery: tuple[ReIDRecord, ...]
    num_train_ids: int
    version: str = ""
    has_cameras: bool = True
    identity_names: tuple[str, ...] = ()
    left_out: int = 0

    def summary(self) -> str:
        """One line of counts for the run log."""

        def part(name: str, records: tuple[ReIDRecord, ...]) -> str:
            return f"{name} {len(records)} images of {len({r.pid for r in records})} ids"

        name = f"{self.dataset} ({self.version})" if self.version else self.dataset
        everything = self.train + self.query + self.gallery
        cameras = (
            f"{len({r.camid for r in everything})} cameras"
            if self.has_cameras
            else "no camera ids (only the query image itself is excluded from its gallery)"
        )
        left_out = f", {self.left_out} junk/distractor images left out" if self.left_out else ""
        parts = ", ".join(
            part(n, r) for n, r in (("train", self.train), ("query", self.query), ("gallery", self.gallery))
        )
        return f"{name}: {parts}, {cameras}{left_out}"


@dataclass(frozen=True)
class ReIDLayout:
    """How to read one named Re-ID layout."""

    parse: Callable[..., ParsedReID]  # (root, **options) -> ParsedReID
    options: tuple[str, ...]
    tree: str


REID_DATASETS: dict[str, ReIDLayout] = {
    "market1501": ReIDLayout(parse_market1501, (), MARKET_TREE),
    "dukemtmc": ReIDLayout(parse_dukemtmc, (), DUKE_TREE),
    "msmt17": ReIDLayout(parse_msmt17, ("include_val",), MSMT_TREE),
    "veri776": ReIDLayout(parse_veri776, (), VERI_TREE),
    "reid_folder": ReIDLayout(parse_reid_folder, ("camera_regex",), REID_FOLDER_TREE),
}


def _records(entries: list[Entry], label_of: dict[int, int] | None) -> tuple[ReIDRecord, ...]:
    return tuple(
        ReIDRecord(path, pid, camid, pid if label_of is None else label_of[pid])
        for path, pid, camid in entries
    )


def load_reid_splits(dataset: str, root: str | os.PathLike[str], **options: Any) -> ReIDSplits:
    """Read the train, query and gallery parts of Re-ID dataset ``dataset`` under ``root``.

    Args:
        dataset: 'market1501', 'dukemtmc', 'msmt17', 'veri776' or 'reid_folder'.
        root: the dataset folder (or, for the public sets, its parent); see each layout's tree
            in ``reid_layouts``.
        **options: msmt17 ``include_val`` (default True: train on list_train + list_val);
            reid_folder ``camera_regex`` (one group, searched in each file name).

    Raises:
        DatasetLayoutError: a missing folder or list file, a file name that does not follow the
            dataset's pattern, a listed image that is not on disk (each names the path and
            prints the expected tree).
        UsageError: an unknown dataset or option, or a bad option value.
    """
    if dataset not in REID_DATASETS:
        raise UsageError(f"unknown Re-ID dataset {dataset!r}; valid names: {sorted(REID_DATASETS)}")
    layout = REID_DATASETS[dataset]
    unknown = sorted(set(options) - set(layout.options))
    if unknown:
        raise UsageError(
            f"unknown option(s) {unknown} for Re-ID dataset {dataset!r}; "
            f"valid options: {list(layout.options)}"
        )
    path = require_exists(Path(root).expanduser(), layout.tree, "dataset root")
    parsed = layout.parse(path, **options)
    train_ids = sorted({pid for _, pid, _ in parsed.train})
    label_of = {pid: label for label, pid in enumerate(train_ids)}
    return ReIDSplits(
        dataset=dataset,
        root=parsed.root,
        train=_records(parsed.train, label_of),
        query=_records(parsed.query, None),
        gallery=_records(parsed.gallery, None),
        num_train_ids=len(train_ids),
        version=parsed.version,
        has_cameras=parsed.has_cameras,
        identity_names=parsed.identity_names,
        left_out=parsed.left_out,
    )


class ReIDDataset(Dataset):
    """Re-ID records as a torch dataset: ``dataset[i] = (transform(image), label)``.

    The label is the training class for training records and the original pid for query and
    gallery records (see ``ReIDRecord``). ``paths``, ``pids``, ``camids`` and ``labels`` are
    aligned with the indices, for the PK sampler (``pids``) and for evaluation.

    Args:
        records: the records, e.g. ``ReIDSplits.train``.
        transform: callable applied to the decoded RGB (H, W, 3) uint8 array (see
            ``reid_transforms``); None returns the array itself.
        description: short name used in log and error messages, e.g. ``"market1501 query"``.
    """

    def __init__(
        self, records: Sequence[ReIDRecord], transform: Transform | None = None, description: str = "reid"
    ) -> None:
        self.description = description
        self.transform = transform
        self.skipped: list[tuple[Path, str]] = []
        self._set_records(records)

    def _set_records(self, records: Sequence[ReIDRecord]) -> None:
        self.records = list(records)
        self.paths = [r.path for r in self.records]
        self.pids = np.array([r.pid for r in self.records], dtype=np.int64)
        self.camids = np.array([r.camid for r in self.records], dtype=np.int64)
        self.labels = np.array([r.label for r in self.records], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = load_rgb(self.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def drop_corrupt(self) -> None:
        """Decode every image once and drop those that fail, reporting them in one warning.

        For query and gallery this changes what is evaluated, which the warning says; by default
        an unreadable image raises a CorruptImageError naming the file when it is loaded.
        """
        bad = find_corrupt(self.paths)
        if not bad:
            return
        bad_paths = {path for path, _ in bad}
        total = len(self)
        self._set_records([r for r in self.records if r.path not in bad_paths])
        self.skipped = bad
        warn_skipped(self.description, bad, total)

    def __repr__(self) -> str:
        return f"ReIDDataset({self.description}: {len(self)} images, {len(set(self.pids.tolist()))} ids)"


@dataclass
class ReIDDatasets:
    """The datasets of one Re-ID run."""

    train: ReIDDataset
    query: ReIDDataset
    gallery: ReIDDataset


def build_reid_datasets(
    splits: ReIDSplits,
    train_transform: Transform | None,
    eval_transform: Transform | None,
    skip_corrupt: bool = False,
) -> ReIDDatasets:
    """Train, query and gallery datasets over ``splits``; logs ``splits.summary()``.

    Args:
        splits: from ``load_reid_splits``.
        train_transform: applied to training images (``reid_transforms.build_reid_train_transform``).
        eval_transform: applied to query and gallery images.
        skip_corrupt: decode every image up front and drop unreadable ones, reporting them once.
    """
    name = splits.dataset
    datasets = ReIDDatasets(
        train=ReIDDataset(splits.train, train_transform, f"{name} train"),
        query=ReIDDataset(splits.query, eval_transform, f"{name} query"),
        gallery=ReIDDataset(splits.gallery, eval_transform, f"{name} gallery"),
    )
    if skip_corrupt:
        for dataset in (datasets.train, datasets.query, datasets.gallery):
            dataset.drop_corrupt()
    logger.info("Re-ID data: %s", splits.summary())
    return datasets
