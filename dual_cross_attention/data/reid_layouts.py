"""Parsers for the object re-identification layouts: files on disk -> (path, pid, camid) per split.

Each ``parse_*`` function reads one layout and returns a ``ParsedReID`` of raw entries with the
dataset's own identity ids; ``reid.load_reid_splits`` relabels the training ids and builds the
records. Camera ids are 0-based everywhere (the 1-based camera number in the file name minus
one); -1 means "no camera known" (``reid_folder`` without ``camera_regex``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from .base import MAX_LISTED, format_tree, require_exists, require_images_exist
from .errors import DatasetLayoutError
from .folder import IMAGE_EXTENSIONS

Entry = tuple[Path, int, int]  # (image path, the dataset's identity id, 0-based camera or -1)
NO_CAMERA = -1

MARKET_TREE = format_tree(
    "market1501 (root may be Market-1501-v15.09.15/ or its parent)",
    """
Market-1501-v15.09.15/
  bounding_box_train/0002_c1s1_000451_03.jpg ...   <pid>_c<camera>s<sequence>_<frame>_<box>.jpg
  query/0001_c1s1_001051_00.jpg ...
  bounding_box_test/0001_c1s1_001051_03.jpg ...    pid -1 = junk (left out), 0000 = distractor (kept)
Files that are not .jpg (Thumbs.db, ...) are ignored.
""",
)
DUKE_TREE = format_tree(
    "dukemtmc (root may be DukeMTMC-reID/ or its parent)",
    """
DukeMTMC-reID/
  bounding_box_train/0001_c2_f0046182.jpg ...      <pid>_c<camera>_f<frame>.jpg
  query/0005_c2_f0046985.jpg ...
  bounding_box_test/0002_c1_f0044158.jpg ...
Files that are not .jpg are ignored.
""",
)
MSMT_TREE = format_tree(
    "msmt17 (root may be MSMT17_V1/, MSMT17_V2/ or their parent)",
    """
MSMT17_V1/        (MSMT17_V2/ has mask_train_v2/ and mask_test_v2/ instead of train/ and test/)
  train/0000/0000_000_01_0303morning_0015_0.jpg ...
  test/0000/0000_000_01_0303morning_0008_0.jpg ...
  list_train.txt    <path relative to train/> <pid>
  list_val.txt      <path relative to train/> <pid>
  list_query.txt    <path relative to test/> <pid>
  list_gallery.txt  <path relative to test/> <pid>
Names are <pid>_<index>_<camera>_<date><time>_..., the camera (01-15) being the third field.
""",
)
VERI_TREE = format_tree(
    "veri776 (root may be VeRi/ or its parent)",
    """
VeRi/
  image_train/0001_c001_00016450_0.jpg ...          <vehicle id>_c<camera>_<frame>_<n>.jpg
  image_query/0002_c002_00030600_0.jpg ...
  image_test/0002_c002_00030600_1.jpg ...
  name_train.txt   one file name of image_train/ per line
  name_query.txt   one file name of image_query/ per line
  name_test.txt    one file name of image_test/ per line (the gallery)
""",
)
REID_FOLDER_TREE = format_tree(
    "reid_folder",
    """
root/
  train/<identity>/*.jpg        (also .jpeg .png .bmp .webp .tif .tiff .gif)
  query/<identity>/*.jpg
  gallery/<identity>/*.jpg
Identities are folder names (any string; the same name in query/ and gallery/ is the same
identity). Cameras come from the file names with the option camera_regex (one group), e.g.
camera_regex='_c(\\d+)_'; without it only the query image itself is excluded from its gallery.
""",
)


@dataclass(frozen=True)
class NamePattern:
    """How a layout's file names encode identity and camera; ``example`` goes into error messages."""

    regex: re.Pattern[str]  # groups: pid, 1-based camera number (MSMT17: the camera only)
    example: str

    def describe(self) -> str:
        return f"names like {self.example} (pattern {self.regex.pattern})"


MARKET_NAME = NamePattern(re.compile(r"^(-?\d+)_c(\d+)s\d+_\d+_\d+\.jpg$", re.I), "0002_c1s1_000451_03.jpg")
DUKE_NAME = NamePattern(re.compile(r"^(-?\d+)_c(\d+)_f\d+\.jpg$", re.I), "0001_c2_f0046182.jpg")
VERI_NAME = NamePattern(re.compile(r"^(\d+)_c(\d+)_\d+_\d+\.jpg$", re.I), "0001_c001_00016450_0.jpg")
MSMT_NAME = NamePattern(re.compile(r"^\d+_\d+_(\d+)_.*\.jpg$", re.I), "0000_000_01_0303morning_0015_0.jpg")
MSMT_VERSIONS = {"MSMT17_V1": ("train", "test"), "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}


@dataclass(frozen=True)
class ParsedReID:
    """What a layout parser found: raw entries per split, before the training ids are relabelled.

    ``left_out`` counts images dropped on purpose (junk pid -1 anywhere, distractor pid 0 in
    train and query), so the run log can account for every file.
    """

    root: Path  # the dataset folder actually read (root, or the sub-folder of it that holds the data)
    train: list[Entry]
    query: list[Entry]
    gallery: list[Entry]
    version: str = ""
    has_cameras: bool = True
    identity_names: tuple[str, ...] = ()
    left_out: int = 0


def _listing(paths: Sequence[object], more: int) -> str:
    listed = "\n  ".join(str(p) for p in paths[:MAX_LISTED])
    return listed + (f"\n  ... and {more} more" if more > 0 else "")


def _bad_names_error(where: Path, bad: Sequence[str], expected: NamePattern, tree: str) -> DatasetLayoutError:
    return DatasetLayoutError(
        f"{where}: {len(bad)} file name(s) are not {expected.describe()}, with cameras numbered from 1:\n  "
        f"{_listing(bad, len(bad) - MAX_LISTED)}\nRename or remove those files.\n{tree}"
    )


def _camera_from(number: str) -> int:
    """The 0-based camera id of a 1-based camera number in a file name; -1 if it is not >= 1."""
    value = int(number)
    return value - 1 if value >= 1 else NO_CAMERA


def _parse_names(paths: Iterable[Path], pattern: NamePattern, where: Path, tree: str) -> list[Entry]:
    """(path, pid, camid) from names matching ``pattern``; raise naming the others."""
    entries, bad = [], []
    for path in paths:
        match = pattern.regex.match(path.name)
        camid = _camera_from(match.group(2)) if match else NO_CAMERA
        if match is None or camid == NO_CAMERA:
            bad.append(path.name)
            continue
        entries.append((path, int(match.group(1)), camid))
    if bad:
        raise _bad_names_error(where, bad, pattern, tree)
    return entries


def _jpgs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix.lower() == ".jpg" and p.is_file())


def _require_dir(path: Path, tree: str, what: str) -> Path:
    require_exists(path, tree, what)
    if not path.is_dir():
        raise DatasetLayoutError(f"{path} is not a folder; expected the {what} there\n{tree}")
    return path


def _require_nonempty(entries: list[Entry], where: Path, tree: str) -> list[Entry]:
    if not entries:
        raise DatasetLayoutError(f"{where} holds no images\n{tree}")
    return entries


def resolve_reid_root(root: Path, marker: str, folder_names: Sequence[str], tree: str) -> Path:
    """``root`` if it holds ``marker``, else the one ``root/<name>`` among ``folder_names`` that does."""
    if (root / marker).exists():
        return root
    found = [root / name for name in folder_names if (root / name / marker).exists()]
    if len(found) == 1:
        return found[0]
    if found:
        raise DatasetLayoutError(
            f"{root} holds several datasets ({', '.join(p.name for p in found)}); point root at one of "
            f"them\n{tree}"
        )
    looked = ", ".join(str(root / name) for name in folder_names)
    raise DatasetLayoutError(
        f"no {marker} in {root} (nor in {looked}); point root at the extracted dataset folder\n{tree}"
    )


def _parse_market_like(
    root: Path, pattern: NamePattern, folder_names: Sequence[str], tree: str
) -> ParsedReID:
    """Market-1501 and DukeMTMC-reID: three folders of images whose names hold pid and camera."""
    root = resolve_reid_root(root, "bounding_box_train", folder_names, tree)
    found = {}
    for split, folder in (
        ("train", "bounding_box_train"),
        ("query", "query"),
        ("gallery", "bounding_box_test"),
    ):
        directory = _require_dir(root / folder, tree, f"{split} folder")
        found[split] = _require_nonempty(
            _parse_names(_jpgs(directory), pattern, directory, tree), directory, tree
        )
    # pid -1 marks junk boxes (a wrong detection or a mix of people); they count neither as a
    # match nor as a mistake. pid 0 marks distractors: real people outside the test identities,
    # kept in the gallery to make retrieval harder but useless to train on or to query.
    train = [e for e in found["train"] if e[1] > 0]
    query = [e for e in found["query"] if e[1] > 0]
    gallery = [e for e in found["gallery"] if e[1] >= 0]
    left_out = sum(len(found[s]) for s in found) - len(train) - len(query) - len(gallery)
    return ParsedReID(
        root,
        _require_nonempty(train, root / "bounding_box_train", tree),
        _require_nonempty(query, root / "query", tree),
        _require_nonempty(gallery, root / "bounding_box_test", tree),
        left_out=left_out,
    )


def parse_market1501(root: Path) -> ParsedReID:
    """Market-1501: ``0002_c1s1_000451_03.jpg`` -> pid 2, camid 0; junk and distractors as above."""
    return _parse_market_like(
        root, MARKET_NAME, ("Market-1501-v15.09.15", "Market-1501", "market1501"), MARKET_TREE
    )


def parse_dukemtmc(root: Path) -> ParsedReID:
    """DukeMTMC-reID: ``0001_c2_f0046182.jpg`` -> pid 1, camid 1 (same junk/distractor rules)."""
    return _parse_market_like(root, DUKE_NAME, ("DukeMTMC-reID", "dukemtmc-reid", "dukemtmc"), DUKE_TREE)


def _msmt_version(root: Path) -> str:
    """'MSMT17_V1' (train/, test/) or 'MSMT17_V2' (mask_train_v2/, mask_test_v2/), from the folders."""
    present = {v: [(root / d).is_dir() for d in dirs] for v, dirs in MSMT_VERSIONS.items()}
    complete = [v for v, flags in present.items() if all(flags)]
    if len(complete) == 1:
        return complete[0]
    if complete:
        raise DatasetLayoutError(
            f"{root} has both the V1 image folders (train/, test/) and the V2 ones (mask_train_v2/, "
            f"mask_test_v2/); keep one version per folder\n{MSMT_TREE}"
        )
    partial = [v for v, flags in present.items() if any(flags)]
    missing = [
        root / d for v in (partial or MSMT_VERSIONS) for d in MSMT_VERSIONS[v] if not (root / d).is_dir()
    ]
    raise DatasetLayoutError(
        f"{root} lacks the MSMT17 image folders: missing {', '.join(str(p) for p in missing)}\n{MSMT_TREE}"
    )


def _read_msmt_list(list_file: Path, image_dir: Path, tree: str) -> list[Entry]:
    """Entries of a '<relative path> <pid>' list; the camera is the third '_' field of the name."""
    require_exists(list_file, tree, "list file")
    entries, bad, paths = [], [], []
    for number, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        rel, _, pid = line.rpartition(" ")
        if not rel.strip() or not pid.lstrip("-").isdigit():
            raise DatasetLayoutError(
                f"{list_file}:{number}: expected '<relative path> <pid>', got {line!r}\n{tree}"
            )
        # Most copies list paths relative to the image folder (0000/0000_...jpg); some prefix it.
        path = image_dir / rel.strip()
        if not path.is_file() and (image_dir.parent / rel.strip()).is_file():
            path = image_dir.parent / rel.strip()
        match = MSMT_NAME.regex.match(path.name)
        camid = _camera_from(match.group(1)) if match else NO_CAMERA
        if camid == NO_CAMERA:
            bad.append(f"{list_file.name}:{number}: {path.name}")
            continue
        paths.append(path)
        entries.append((path, int(pid), camid))
    if bad:
        raise _bad_names_error(list_file, bad, MSMT_NAME, tree)
    require_images_exist(paths, list_file, tree)
    return entries


def parse_msmt17(root: Path, include_val: bool = True) -> ParsedReID:
    """MSMT17 V1 or V2 (detected from the image folders); train = list_train (+ list_val by default).

    Args:
        root: MSMT17_V1/ or MSMT17_V2/, or their parent.
        include_val: train on list_train.txt and list_val.txt (the customary protocol: 32,621
            images of 1,041 ids); False trains on list_train.txt alone.
    """
    if not isinstance(include_val, bool):
        raise UsageError(f"msmt17 option include_val must be true or false, got {include_val!r}")
    root = resolve_reid_root(root, "list_train.txt", ("MSMT17_V1", "MSMT17_V2", "MSMT17"), MSMT_TREE)
    version = _msmt_version(root)
    train_dir, test_dir = (root / d for d in MSMT_VERSIONS[version])
    train = _read_msmt_list(root / "list_train.txt", train_dir, MSMT_TREE)
    if include_val:
        train += _read_msmt_list(root / "list_val.txt", train_dir, MSMT_TREE)
    query = _read_msmt_list(root / "list_query.txt", test_dir, MSMT_TREE)
    gallery = _read_msmt_list(root / "list_gallery.txt", test_dir, MSMT_TREE)
    for entries, name in (
        (train, "list_train.txt"),
        (query, "list_query.txt"),
        (gallery, "list_gallery.txt"),
    ):
        _require_nonempty(entries, root / name, MSMT_TREE)
    return ParsedReID(root, train, query, gallery, version=version)


def _read_name_list(list_file: Path, tree: str) -> list[str]:
    require_exists(list_file, tree, "list file")
    return [line.strip() for line in list_file.read_text(encoding="utf-8").splitlines() if line.strip()]


def parse_veri776(root: Path) -> ParsedReID:
    """VeRi-776: the images named in name_{train,query,test}.txt; ``0001_c001_...jpg`` -> pid 1, camid 0."""
    root = resolve_reid_root(root, "name_train.txt", ("VeRi", "VeRi-776", "veri776"), VERI_TREE)
    found = {}
    for split, folder, listed in (
        ("train", "image_train", "name_train.txt"),
        ("query", "image_query", "name_query.txt"),
        ("gallery", "image_test", "name_test.txt"),
    ):
        directory = _require_dir(root / folder, VERI_TREE, f"{split} image folder")
        paths = [directory / name for name in _read_name_list(root / listed, VERI_TREE)]
        require_images_exist(paths, root / listed, VERI_TREE)
        found[split] = _require_nonempty(
            _parse_names(paths, VERI_NAME, root / listed, VERI_TREE), root / listed, VERI_TREE
        )
    return ParsedReID(root, found["train"], found["query"], found["gallery"])


def _identity_images(split_dir: Path) -> dict[str, list[Path]]:
    return {
        d.name: sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        for d in sorted(split_dir.iterdir())
        if d.is_dir()
    }


def _compile_camera_regex(camera_regex: object) -> re.Pattern[str]:
    if not isinstance(camera_regex, str):
        raise UsageError(f"reid_folder option camera_regex must be a string, got {camera_regex!r}")
    try:
        pattern = re.compile(camera_regex)
    except re.error as err:
        raise UsageError(
            f"reid_folder option camera_regex={camera_regex!r} is not a valid regex: {err}"
        ) from err
    if pattern.groups != 1:
        raise UsageError(
            f"reid_folder option camera_regex={camera_regex!r} must have exactly one group, the camera "
            f"(it has {pattern.groups}), e.g. '_c(\\d+)_'"
        )
    return pattern


def _camera_ids(names: Sequence[str]) -> dict[str, int]:
    """Camera strings -> 0-based ids in sorted order (numeric order when all are digits)."""
    unique = set(names)
    numeric = all(n.isdigit() for n in unique)
    ordered = sorted(unique, key=int) if numeric else sorted(unique)
    return {name: i for i, name in enumerate(ordered)}


def parse_reid_folder(root: Path, camera_regex: str | None = None) -> ParsedReID:
    """Users' data: ``train/``, ``query/``, ``gallery/`` with one folder per identity.

    pids are the positions of the identity names in the sorted names of all three splits, so a
    name means the same pid in query and gallery. With ``camera_regex`` (searched in each file
    name, one group) the distinct camera strings become 0-based ids; without it every camid is -1
    and ``has_cameras`` is False.
    """
    pattern = None if camera_regex is None else _compile_camera_regex(camera_regex)
    tree = REID_FOLDER_TREE
    images = {
        split: _identity_images(_require_dir(root / split, tree, f"{split} folder"))
        for split in ("train", "query", "gallery")
    }
    for identity, paths in images["train"].items():
        if not paths:
            raise DatasetLayoutError(f"{root / 'train' / identity} holds no images\n{tree}")
    names = sorted({identity for per_split in images.values() for identity in per_split})
    pid_of = {name: i for i, name in enumerate(names)}
    cameras: dict[Path, str] = {}
    if pattern is not None:
        bad = []
        for path in (p for per_split in images.values() for paths in per_split.values() for p in paths):
            match = pattern.search(path.name)
            if match is None or not match.group(1):
                bad.append(path)
            else:
                cameras[path] = match.group(1)
        if bad:
            raise DatasetLayoutError(
                f"camera_regex={pattern.pattern!r} finds no camera in {len(bad)} file name(s):\n  "
                f"{_listing(bad, len(bad) - MAX_LISTED)}\nFix the regex or the names.\n{tree}"
            )
    camid_of = _camera_ids(list(cameras.values()))
    parts = {}
    for split, per_split in images.items():
        entries = [
            (path, pid_of[identity], camid_of[cameras[path]] if pattern is not None else NO_CAMERA)
            for identity, paths in per_split.items()
            for path in paths
        ]
        if not entries:
            raise DatasetLayoutError(f"{root / split} holds no images in identity folders\n{tree}")
        parts[split] = entries
    return ParsedReID(
        root,
        parts["train"],
        parts["query"],
        parts["gallery"],
        has_cameras=pattern is not None,
        identity_names=tuple(names),
    )
