"""FGVC-Aircraft 2013b, at any of its three label levels, with the copyright banner removed."""

from __future__ import annotations

from pathlib import Path

from .base import BottomCrop, ImageDataset, format_tree, read_id_file, require_exists, require_images_exist
from .errors import DatasetLayoutError

AIRCRAFT_TREE = format_tree(
    "aircraft (root may be fgvc-aircraft-2013b/, its data/, or their parent)",
    """
fgvc-aircraft-2013b/data/
  images/0034309.jpg ...
  variants.txt, families.txt, manufacturers.txt      one class name per line
  images_<level>_<split>.txt                         '<image id> <class name>', e.g. '1025794 707-320'
      level: variant | family | manufacturer;  split: train | val | trainval | test
""",
)
AIRCRAFT_SPLITS = ("train", "val", "trainval", "test")
CLASS_FILES = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}
BANNER_PIXELS = 20  # every image carries a 20 px copyright banner at the bottom


def resolve_aircraft_root(root: Path) -> Path:
    """The ``data/`` folder, given it, its parent fgvc-aircraft-2013b/, or the folder above that."""
    candidates = (root, root / "data", root / "fgvc-aircraft-2013b" / "data")
    for candidate in candidates:
        if (candidate / "images").is_dir() and (candidate / "variants.txt").is_file():
            return candidate
    require_exists(root, AIRCRAFT_TREE, "dataset root")
    listed = ", ".join(str(c) for c in candidates)
    raise DatasetLayoutError(f"no images/ and variants.txt in any of {listed}\n{AIRCRAFT_TREE}")


def _read_classes(path: Path) -> list[str]:
    require_exists(path, AIRCRAFT_TREE, "class list")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise DatasetLayoutError(f"{path} lists no classes\n{AIRCRAFT_TREE}")
    return names


def load_aircraft(
    root: Path,
    split: str,
    level: str = "variant",
    crop_banner: bool = True,
    description: str = "aircraft",
) -> ImageDataset:
    """FGVC-Aircraft ``split`` at ``level`` granularity.

    Args:
        root: see ``resolve_aircraft_root``.
        split: 'train', 'val', 'trainval' or 'test' (training normally uses 'trainval').
        level: 'variant' (100 classes), 'family' or 'manufacturer'.
        crop_banner: remove the bottom 20 px copyright banner (it is the same in every class,
            so it only wastes tokens, and its text could become a spurious cue).
    """
    if split not in AIRCRAFT_SPLITS:
        raise ValueError(f"{description} has splits {AIRCRAFT_SPLITS}, got {split!r}")
    if level not in CLASS_FILES:
        raise ValueError(f"{description} level must be one of {sorted(CLASS_FILES)}, got {level!r}")
    data = resolve_aircraft_root(root)
    classes = _read_classes(data / CLASS_FILES[level])
    label_of = {name: i for i, name in enumerate(classes)}
    label_file = data / f"images_{level}_{split}.txt"
    samples, targets = [], []
    for image_id, name in read_id_file(label_file, AIRCRAFT_TREE):
        if name not in label_of:
            raise DatasetLayoutError(
                f"{label_file}: image {image_id} has class {name!r}, which is not in "
                f"{data / CLASS_FILES[level]}\n{AIRCRAFT_TREE}"
            )
        samples.append(data / "images" / f"{image_id}.jpg")
        targets.append(label_of[name])
    require_images_exist(samples, label_file, AIRCRAFT_TREE)
    crop = BottomCrop(BANNER_PIXELS) if crop_banner else None
    return ImageDataset(samples, targets, classes, crop=crop, description=f"{description} {split} ({level})")
