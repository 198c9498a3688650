"""Builders of tiny on-disk datasets in every layout, for the tests/test_data_*.py files.

Images are real JPEGs (a few pixels, so the suite stays fast); .mat files are written with
scipy.io.savemat using the field names of the real Stanford Cars files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

CARS_CLASSES = [
    "AM General Hummer SUV 2000",
    "Ram C/V Cargo Van Minivan 2012",
    "smart fortwo Convertible 2012",
]


def write_jpeg(
    path: Path, width: int = 20, height: int = 16, colour: tuple[int, int, int] = (200, 30, 60)
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), colour).save(path, quality=95)
    return path


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def make_cub(root: Path) -> Path:
    """CUB_200_2011/ under root: 3 classes, 6 images; train ids 1,3,5,6, test ids 2,4.

    Expected train labels [0, 1, 2, 2], test labels [0, 1] (class ids 1-based in the files).
    """
    cub = root / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    images = [(1, 1, 1), (2, 1, 0), (3, 2, 1), (4, 2, 0), (5, 3, 1), (6, 3, 1)]  # (id, class id, is_train)
    write_lines(cub / "classes.txt", [f"{i + 1} {name}" for i, name in enumerate(classes)])
    rel = {i: f"{classes[c - 1]}/img_{i}.jpg" for i, c, _ in images}
    write_lines(cub / "images.txt", [f"{i} {rel[i]}" for i, _, _ in images])
    write_lines(cub / "image_class_labels.txt", [f"{i} {c}" for i, c, _ in images])
    write_lines(cub / "train_test_split.txt", [f"{i} {t}" for i, _, t in images])
    for i, _, _ in images:
        write_jpeg(cub / "images" / rel[i])
    return cub


def _struct(records: list[dict], fields: list[str]) -> np.ndarray:
    """A MATLAB 1xN struct array as savemat writes it (and loadmat gives it back)."""
    array = np.zeros((1, len(records)), dtype=[(f, object) for f in fields])
    for i, record in enumerate(records):
        for f in fields:
            value = record[f]
            array[0, i][f] = value if isinstance(value, str) else np.array([[value]], dtype=np.uint8)
    return array


def _cell(strings: list[str]) -> np.ndarray:
    cell = np.empty((1, len(strings)), dtype=object)
    cell[0, :] = strings
    return cell


BOX = {"bbox_x1": 1, "bbox_y1": 2, "bbox_x2": 15, "bbox_y2": 12}
# (file name, 1-based class) for the devkit and CSV layouts; expected 0-based labels [1, 0, 2] / [2, 1]
CARS_TRAIN = [("00001.jpg", 2), ("00002.jpg", 1), ("00003.jpg", 3)]
CARS_TEST = [("00001.jpg", 3), ("00002.jpg", 2)]


def make_cars_devkit(root: Path, test_labels_in: str = "root", nested: bool = False) -> Path:
    """The original archives: cars_train/, cars_test/, devkit/*.mat, cars_test_annos_withlabels.mat."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    (root / "devkit").mkdir(parents=True)
    scipy.io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": _cell(CARS_CLASSES)})
    for split, rows in (("train", CARS_TRAIN), ("test", CARS_TEST)):
        annos = _struct([{**BOX, "class": c, "fname": f} for f, c in rows], fields)
        name = "devkit/cars_train_annos.mat" if split == "train" else "cars_test_annos_withlabels.mat"
        if split == "test" and test_labels_in == "devkit":
            name = "devkit/cars_test_annos_withlabels.mat"
        scipy.io.savemat(root / name, {"annotations": annos})
        image_dir = root / f"cars_{split}" / (f"cars_{split}" if nested else "")
        for fname, _ in rows:
            write_jpeg(image_dir / fname)
    return root


# (relative path, 1-based class, test flag); expected train labels [0, 2], test labels [1]
CARS_MERGED = [("car_ims/000001.jpg", 1, 0), ("car_ims/000002.jpg", 2, 1), ("car_ims/000003.jpg", 3, 0)]


def make_cars_merged(root: Path) -> Path:
    """car_ims/ and one cars_annos.mat holding annotations (with a test flag) and class_names."""
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    records = [{**BOX, "relative_im_path": p, "class": c, "test": t} for p, c, t in CARS_MERGED]
    root.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(
        root / "cars_annos.mat", {"annotations": _struct(records, fields), "class_names": _cell(CARS_CLASSES)}
    )
    for path, _, _ in CARS_MERGED:
        write_jpeg(root / path)
    return root


def make_cars_csv(root: Path, class_folders: bool = True) -> Path:
    """The Kaggle copy: anno_*.csv, names.csv, car_data/car_data/<split>/<class>/ (or flat <split>/)."""
    write_lines(root / "names.csv", CARS_CLASSES)
    for split, rows in (("train", CARS_TRAIN), ("test", CARS_TEST)):
        write_lines(root / f"anno_{split}.csv", [f"{f},1,2,15,12,{c}" for f, c in rows])
        for fname, c in rows:
            if class_folders:  # that copy spells '/' in class folder names as '-'
                folder = root / "car_data" / "car_data" / split / CARS_CLASSES[c - 1].replace("/", "-")
            else:
                folder = root / split
            write_jpeg(folder / fname)
    return root


AIRCRAFT_VARIANTS = ["707-320", "A300B4", "Cessna 172", "F/A-18"]
AIRCRAFT_FAMILIES = ["Boeing 707", "A300", "Cessna 172", "F/A-18"]
AIRCRAFT_MANUFACTURERS = ["Boeing", "Airbus", "Cessna", "McDonnell Douglas"]
# image id -> (variant index, split); family and manufacturer follow the variant index
AIRCRAFT_IMAGES = {
    "0034309": (0, "train"),
    "0034958": (1, "train"),
    "0034310": (0, "train"),
    "0037511": (2, "val"),
    "0037512": (3, "val"),
    "0037513": (2, "val"),
    "1025794": (3, "test"),
    "1340192": (2, "test"),
    "0056978": (0, "test"),
}


def make_aircraft(root: Path, height: int = 50, width: int = 40) -> Path:
    """fgvc-aircraft-2013b/data/ under root. Images are blue with a white 20 px bottom banner."""
    data = root / "fgvc-aircraft-2013b" / "data"
    write_lines(data / "variants.txt", AIRCRAFT_VARIANTS)
    write_lines(data / "families.txt", AIRCRAFT_FAMILIES)
    write_lines(data / "manufacturers.txt", AIRCRAFT_MANUFACTURERS)
    levels = {
        "variant": AIRCRAFT_VARIANTS,
        "family": AIRCRAFT_FAMILIES,
        "manufacturer": AIRCRAFT_MANUFACTURERS,
    }
    for level, names in levels.items():
        for split in ("train", "val", "test"):
            ids = [i for i, (_, s) in AIRCRAFT_IMAGES.items() if s == split]
            write_lines(
                data / f"images_{level}_{split}.txt", [f"{i} {names[AIRCRAFT_IMAGES[i][0]]}" for i in ids]
            )
        ids = [i for i, (_, s) in AIRCRAFT_IMAGES.items() if s in ("train", "val")]
        write_lines(
            data / f"images_{level}_trainval.txt", [f"{i} {names[AIRCRAFT_IMAGES[i][0]]}" for i in ids]
        )
    for image_id in AIRCRAFT_IMAGES:
        pixels = np.zeros((height, width, 3), dtype=np.uint8)
        pixels[:] = (20, 40, 220)
        pixels[height - 20 :] = 255
        (data / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(data / "images" / f"{image_id}.jpg", quality=95)
    return data.parent


def make_folder(root: Path, counts: dict[str, dict[str, int]]) -> Path:
    """root/<split>/<class>/<n>.jpg with counts[split][class] images each."""
    for split, per_class in counts.items():
        for name, n in per_class.items():
            for i in range(n):
                write_jpeg(root / split / name / f"{i:03d}.jpg")
    return root
