"""Builders of tiny Re-ID trees (8x8 JPEGs) with the real datasets' file names, for test_data_reid.py."""

from __future__ import annotations

from pathlib import Path

from data_helpers import write_jpeg, write_lines


def jpeg(path: Path) -> Path:
    return write_jpeg(path, width=8, height=8)


# Market-1501: train pids 2 (3 images), 7, 15; junk (-1) and distractor (0) in the gallery.
MARKET = {
    "bounding_box_train": [
        "0002_c1s1_000451_03.jpg",
        "0002_c2s1_000301_01.jpg",
        "0002_c6s1_000801_02.jpg",
        "0007_c1s1_000576_01.jpg",
        "0007_c3s1_000651_04.jpg",
        "0015_c5s1_002176_02.jpg",
        "0015_c6s2_004523_01.jpg",
    ],
    "query": ["0001_c1s1_001051_00.jpg", "0003_c3s1_000551_00.jpg"],
    "bounding_box_test": [
        "-1_c1s1_000401_03.jpg",
        "-1_c3s1_000626_01.jpg",
        "0000_c6s1_000001_01.jpg",
        "0001_c2s1_000301_01.jpg",
        "0001_c1s1_001051_03.jpg",
        "0003_c4s1_002626_02.jpg",
    ],
}
DUKE = {
    "bounding_box_train": ["0001_c2_f0046182.jpg", "0001_c5_f0051341.jpg", "0008_c1_f0061008.jpg"],
    "query": ["0005_c2_f0046985.jpg"],
    "bounding_box_test": ["0005_c1_f0044158.jpg", "0019_c8_f0184356.jpg"],
}


def make_market_like(root: Path, names: dict[str, list[str]]) -> Path:
    for folder, files in names.items():
        for name in files:
            jpeg(root / folder / name)
    return root


def make_market(root: Path) -> Path:
    make_market_like(root, MARKET)
    (root / "bounding_box_test" / "Thumbs.db").write_bytes(b"\x00junk")
    (root / "query" / "readme.txt").write_text("not an image")
    return root


# MSMT17: (relative path under the image folder, pid) per list; camera = third '_' field.
MSMT_LISTS = {
    "list_train.txt": [
        ("0000/0000_000_01_0303morning_0015_0.jpg", 0),
        ("0000/0000_001_11_0303noon_0035_1.jpg", 0),
    ],
    "list_val.txt": [("0003/0003_000_15_0303afternoon_0100_0.jpg", 3)],
    "list_query.txt": [("0000/0000_000_05_0303morning_0008_0.jpg", 0)],
    "list_gallery.txt": [
        ("0000/0000_003_02_0303morning_0020_1.jpg", 0),
        ("0001/0001_000_07_0304noon_0201_0.jpg", 1),
    ],
}


def make_msmt(root: Path, version: str = "V1") -> Path:
    """root/MSMT17_<version>/ with the four list files and the listed images."""
    base = root / f"MSMT17_{version}"
    train_dir, test_dir = ("train", "test") if version == "V1" else ("mask_train_v2", "mask_test_v2")
    for list_name, rows in MSMT_LISTS.items():
        write_lines(base / list_name, [f"{rel} {pid}" for rel, pid in rows])
        folder = train_dir if list_name in ("list_train.txt", "list_val.txt") else test_dir
        for rel, _ in rows:
            jpeg(base / folder / rel)
    return base


VERI = {
    "train": ["0001_c001_00016450_0.jpg", "0001_c002_00016600_1.jpg", "0005_c019_00021625_0.jpg"],
    "query": ["0002_c002_00030600_0.jpg"],
    "test": ["0002_c003_00030610_1.jpg", "0006_c020_00040000_0.jpg"],
}


def make_veri(root: Path) -> Path:
    base = root / "VeRi"
    for split, names in VERI.items():
        write_lines(base / f"name_{split}.txt", names)
        for name in names:
            jpeg(base / f"image_{split}" / name)
    jpeg(base / "image_train" / "0009_c001_00000001_0.jpg")  # on disk but not listed: not loaded
    return base


REID_FOLDER = {
    "train": {"bob": ["bob_c2_1.jpg", "bob_c1_2.png"], "alice": ["alice_c1_1.jpg", "alice_c3_2.jpg"]},
    "query": {"zed": ["zed_c1_1.jpg"], "yan": ["yan_c2_1.jpg"]},
    "gallery": {"zed": ["zed_c2_2.jpg", "zed_c1_3.jpg"], "yan": ["yan_c10_2.jpg"], "xia": ["xia_c1_1.jpg"]},
}


def make_reid_folder(root: Path) -> Path:
    for split, identities in REID_FOLDER.items():
        for identity, names in identities.items():
            for name in names:
                jpeg(root / split / identity / name)
    return root
