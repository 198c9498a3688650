"""Stanford Cars in the three layouts that circulate since the original site went away.

(a) ``devkit``: the original archives (cars_train/, cars_test/, devkit/*.mat and the later
    cars_test_annos_withlabels.mat); the Kaggle copy that nests cars_train/cars_train/ is
    accepted too. (b) ``merged``: car_ims/ with the single cars_annos.mat. (c) ``csv``: the
    Kaggle "by classes folder" copy with anno_train.csv / anno_test.csv / names.csv.
The layout is detected from marker files; pass ``layout=`` when a folder holds several.
Labels are 1-based in every layout and 0-based in the dataset.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io

from .base import ImageDataset, format_tree, require_exists, require_images_exist
from .errors import DatasetLayoutError
from .folder import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

DEVKIT_TREE = """(a) devkit:
  cars_train/00001.jpg ...              (or cars_train/cars_train/00001.jpg ...)
  cars_test/00001.jpg ...
  devkit/cars_meta.mat                  class_names
  devkit/cars_train_annos.mat           annotations: bbox_x1 bbox_y1 bbox_x2 bbox_y2 class fname
  cars_test_annos_withlabels.mat        annotations with class (in root or devkit/)"""
MERGED_TREE = """(b) merged:
  car_ims/000001.jpg ...
  cars_annos.mat                        annotations: relative_im_path bbox_x1 bbox_y1 bbox_x2
                                        bbox_y2 class test;  class_names"""
CSV_TREE = """(c) csv:
  anno_train.csv, anno_test.csv         no header: fname,x1,y1,x2,y2,class
  names.csv                             one class name per line
  train/, test/                         (or car_data/[car_data/]train/, cars_train/) holding the
                                        images flat or in one folder per class"""
LAYOUT_TREES = {"devkit": DEVKIT_TREE, "merged": MERGED_TREE, "csv": CSV_TREE}
ALL_TREES = format_tree(
    "cars (one of three layouts, detected automatically)", "\n".join(LAYOUT_TREES.values())
)
CARS_SPLITS = ("train", "test")


def _tree(layout: str) -> str:
    return format_tree(f"cars, {layout} layout", LAYOUT_TREES[layout])


def detect_layout(root: Path) -> str:
    """Which of the three layouts ``root`` holds, from its marker files."""
    markers = {
        "devkit": (root / "devkit").is_dir() or (root / "cars_train").is_dir(),
        "merged": (root / "cars_annos.mat").is_file() or (root / "car_ims").is_dir(),
        "csv": (root / "anno_train.csv").is_file() or (root / "anno_test.csv").is_file(),
    }
    found = [name for name, present in markers.items() if present]
    if not found:
        require_exists(root, ALL_TREES, "dataset root")
        raise DatasetLayoutError(f"{root} holds none of the Stanford Cars layouts\n{ALL_TREES}")
    if len(found) > 1:
        raise DatasetLayoutError(
            f"{root} holds files of several Stanford Cars layouts ({', '.join(found)}); pass "
            f"layout='devkit', 'merged' or 'csv' to choose one\n{ALL_TREES}"
        )
    return found[0]


def _load_struct(path: Path, key: str, fields: tuple[str, ...], tree: str) -> dict[str, list]:
    """Read the struct array ``key`` of a .mat file into {field: list of values}."""
    require_exists(path, tree, "annotation file")
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True)
    except (ValueError, OSError, TypeError) as err:
        raise DatasetLayoutError(f"cannot read {path} as a .mat file: {err}\n{tree}") from err
    if key not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DatasetLayoutError(f"{path} has no variable {key!r} (found {found})\n{tree}")
    value = np.atleast_1d(mat[key])
    if value.dtype.names is None:
        if fields:
            raise DatasetLayoutError(
                f"{path}: {key} is not a struct array with fields {list(fields)}\n{tree}"
            )
        return {key: [str(v) for v in value]}  # a cell array of strings, e.g. class_names
    missing = [f for f in fields if f not in value.dtype.names]
    if missing:
        raise DatasetLayoutError(
            f"{path}: {key} lacks field(s) {missing} (has {list(value.dtype.names)})\n{tree}"
        )
    return {f: [v.item() if isinstance(v, np.ndarray) else v for v in value[f]] for f in fields}


def _class_names(path: Path, tree: str) -> list[str]:
    return _load_struct(path, "class_names", (), tree)["class_names"]


def _labels(raw: list, num_classes: int, source: Path, tree: str) -> list[int]:
    """1-based class ids to 0-based labels, checked against the number of class names."""
    try:
        labels = [int(v) - 1 for v in raw]
    except (TypeError, ValueError) as err:
        raise DatasetLayoutError(f"{source}: class ids must be integers ({err})\n{tree}") from err
    bad = sorted({v + 1 for v in labels if not 0 <= v < num_classes})
    if bad:
        raise DatasetLayoutError(f"{source}: class ids {bad[:5]} outside 1..{num_classes}\n{tree}")
    return labels


def _nested_dir(folder: Path) -> Path:
    """``folder`` or the Kaggle-style ``folder/folder`` when the images sit one level deeper."""
    inner = folder / folder.name
    if inner.is_dir():
        logger.info("Stanford Cars: reading images from nested folder %s", inner)
        return inner
    return folder


def _load_devkit(root: Path, split: str) -> tuple[list[Path], list[int], list[str], Path]:
    tree = _tree("devkit")
    classes = _class_names(root / "devkit" / "cars_meta.mat", tree)
    fields = ("fname", "class")
    if split == "train":
        annos = root / "devkit" / "cars_train_annos.mat"
    else:
        candidates = [
            root / "cars_test_annos_withlabels.mat",
            root / "devkit" / "cars_test_annos_withlabels.mat",
        ]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise DatasetLayoutError(
                f"missing test labels: neither {candidates[0]} nor {candidates[1]} exists (the devkit's "
                f"cars_test_annos.mat has no labels; get cars_test_annos_withlabels.mat)\n{tree}"
            )
        annos = found[0]
    table = _load_struct(annos, "annotations", fields, tree)
    image_dir = _nested_dir(require_exists(root / f"cars_{split}", tree, "image folder"))
    samples = [image_dir / str(name) for name in table["fname"]]
    return samples, _labels(table["class"], len(classes), annos, tree), classes, annos


def _load_merged(root: Path, split: str) -> tuple[list[Path], list[int], list[str], Path]:
    tree = _tree("merged")
    annos = root / "cars_annos.mat"
    table = _load_struct(annos, "annotations", ("relative_im_path", "class", "test"), tree)
    classes = _class_names(annos, tree)
    labels = _labels(table["class"], len(classes), annos, tree)
    wanted = 1 if split == "test" else 0
    keep = [i for i, flag in enumerate(table["test"]) if int(flag) == wanted]
    samples = [root / str(table["relative_im_path"][i]) for i in keep]
    return samples, [labels[i] for i in keep], classes, annos


def _csv_image_dir(root: Path, split: str, tree: str) -> Path:
    candidates = [
        root / split,
        root / "car_data" / split,
        root / "car_data" / "car_data" / split,
        root / f"cars_{split}",
    ]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    listed = ", ".join(str(c) for c in candidates)
    raise DatasetLayoutError(f"no image folder for split {split!r}; looked for {listed}\n{tree}")


def _index_images(folder: Path, tree: str) -> dict[str, Path]:
    """Map file name -> path for every image under ``folder`` (flat or in class folders).

    Indexing by file name avoids guessing how each copy spelled class folders whose names hold
    a '/' (e.g. 'Ram C/V Cargo Van Minivan 2012').
    """
    index: dict[str, Path] = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(dirpath) / name
            if name in index:
                raise DatasetLayoutError(
                    f"image name {name!r} appears twice under {folder}: {index[name]} and {path}; "
                    f"the CSV names images by file name only, so names must be unique per split\n{tree}"
                )
            index[name] = path
    return index


def _load_csv(root: Path, split: str) -> tuple[list[Path], list[int], list[str], Path]:
    tree = _tree("csv")
    names_file = require_exists(root / "names.csv", tree, "class name file")
    classes = [line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    annos = require_exists(root / f"anno_{split}.csv", tree, "annotation file")
    try:
        table = pd.read_csv(annos, header=None, dtype={0: str})
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as err:
        raise DatasetLayoutError(f"cannot parse {annos}: {err}\n{tree}") from err
    if table.shape[1] != 6:
        raise DatasetLayoutError(
            f"{annos} has {table.shape[1]} columns, expected 6 (fname,x1,y1,x2,y2,class, no header)\n{tree}"
        )
    image_dir = _csv_image_dir(root, split, tree)
    index = _index_images(image_dir, tree)
    # A name not found maps to a path under the split folder, so the missing-image check names it.
    samples = [index.get(name, image_dir / name) for name in table[0]]
    return samples, _labels(list(table[5]), len(classes), annos, tree), classes, annos


LOADERS = {"devkit": _load_devkit, "merged": _load_merged, "csv": _load_csv}


def load_cars(root: Path, split: str, layout: str | None = None, description: str = "cars") -> ImageDataset:
    """Stanford Cars ``split`` ('train' or 'test') from any of the three layouts.

    Args:
        root: folder holding the layout's files.
        split: 'train' or 'test'.
        layout: 'devkit', 'merged' or 'csv'; None detects it from the files present.
    """
    if split not in CARS_SPLITS:
        raise ValueError(
            f"{description} has splits {CARS_SPLITS}, got {split!r} (use val_fraction for a val split)"
        )
    if layout is None:
        layout = detect_layout(root)
    elif layout not in LOADERS:
        raise ValueError(f"cars layout must be one of {sorted(LOADERS)}, got {layout!r}")
    logger.info("Stanford Cars at %s: %s layout", root, layout)
    samples, targets, classes, label_file = LOADERS[layout](root, split)
    require_images_exist(samples, label_file, _tree(layout))
    return ImageDataset(samples, targets, classes, description=f"{description} {split}")
