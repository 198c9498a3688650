"""CUB-200-2011 (and the demo set, which is written in the same layout)."""

from __future__ import annotations

from pathlib import Path

from .base import ImageDataset, format_tree, read_id_file, require_images_exist
from .errors import DatasetLayoutError

CUB_TREE = format_tree(
    "cub (root may be CUB_200_2011/ or its parent)",
    """
CUB_200_2011/
  images.txt               <image_id> <relative path under images/>
  image_class_labels.txt   <image_id> <class_id>          (class ids 1-based)
  train_test_split.txt     <image_id> <1 = train, 0 = test>
  classes.txt              <class_id> <class name>
  images/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg ...
""",
)
CUB_SPLITS = ("train", "test")


def resolve_cub_root(root: Path) -> Path:
    """``root`` itself or ``root/CUB_200_2011``, whichever holds ``images.txt``."""
    for candidate in (root, root / "CUB_200_2011"):
        if (candidate / "images.txt").is_file():
            return candidate
    raise DatasetLayoutError(
        f"no images.txt in {root} or {root / 'CUB_200_2011'}; point root at the extracted "
        f"CUB_200_2011 folder\n{CUB_TREE}"
    )


def _by_id(path: Path, ids: list[str], tree: str) -> dict[str, str]:
    """Read an id file and check it covers exactly the image ids of images.txt."""
    table = dict(read_id_file(path, tree))
    missing = [i for i in ids if i not in table]
    if missing:
        raise DatasetLayoutError(
            f"{path} has no entry for image id(s) {missing[:5]} listed in images.txt\n{tree}"
        )
    return table


def _class_index(root: Path) -> tuple[list[str], dict[str, int]]:
    """Class names in classes.txt order and the map from the file's class id to a 0-based label."""
    pairs = read_id_file(root / "classes.txt", CUB_TREE)
    if not pairs:
        raise DatasetLayoutError(f"{root / 'classes.txt'} lists no classes\n{CUB_TREE}")
    names = [name for _, name in pairs]
    return names, {class_id: label for label, (class_id, _) in enumerate(pairs)}


def load_cub(root: Path, split: str, description: str = "cub") -> ImageDataset:
    """CUB-200-2011 ``split`` ('train' or 'test') from the official split file.

    Image and class ids are 1-based in the files; labels are the 0-based position of the class
    in classes.txt.
    """
    if split not in CUB_SPLITS:
        raise ValueError(
            f"{description} has splits {CUB_SPLITS}, got {split!r} (use val_fraction for a val split)"
        )
    root = resolve_cub_root(root)
    images = read_id_file(root / "images.txt", CUB_TREE)
    ids = [image_id for image_id, _ in images]
    labels = _by_id(root / "image_class_labels.txt", ids, CUB_TREE)
    is_train = _by_id(root / "train_test_split.txt", ids, CUB_TREE)
    classes, label_of = _class_index(root)
    wanted = "1" if split == "train" else "0"
    samples, targets = [], []
    for image_id, rel in images:
        if is_train[image_id] not in ("0", "1"):
            raise DatasetLayoutError(
                f"{root / 'train_test_split.txt'}: image id {image_id} has split flag "
                f"{is_train[image_id]!r}, expected 1 (train) or 0 (test)\n{CUB_TREE}"
            )
        if is_train[image_id] != wanted:
            continue
        if labels[image_id] not in label_of:
            raise DatasetLayoutError(
                f"{root / 'image_class_labels.txt'}: image id {image_id} has class id "
                f"{labels[image_id]!r}, which is not in {root / 'classes.txt'}\n{CUB_TREE}"
            )
        samples.append(root / "images" / rel)
        targets.append(label_of[labels[image_id]])
    require_images_exist(samples, root / "images.txt", CUB_TREE)
    return ImageDataset(samples, targets, classes, description=f"{description} {split}")
