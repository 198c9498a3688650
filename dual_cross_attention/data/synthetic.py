"""The built-in demo set: a small fine-grained task a from-scratch ViT learns on a CPU in minutes.

Every image shows the same kind of object (an elliptic body with a head, an eye and a tail, in a
random colour, facing left or right) at a random position over a random textured background.
The class is decided by one thing only: a small mark on the body (a 16x8 px "wing bar": one of
ten 8x8 patterns, drawn twice side by side).
This mimics fine-grained categorization (all birds look alike; a wing bar tells them apart) and
is the setting DCAL's local-region attention is built for.

Design decisions, each taken for a measured reason (trials on a 2-core CPU):

- **The mark is snapped to the patch grid.** Its position is random, but drawn from the 8 px
  cells of the image (the patch grid of a patch-8 ViT at the 64 px demo size), so each copy
  fills exactly one patch. A ViT trained from scratch learned such a task within about two
  minutes on two CPU cores; with the detail at arbitrary pixel offsets it stayed at chance for
  minutes. Train the demo without random crops (resize and crop both equal to the image size)
  so that augmentation keeps the alignment.
- **The pattern is drawn twice.** Two patches carry the class instead of one, which doubles
  what a freshly initialised ViT's CLS token sees of it (a linear probe on the CLS feature of
  an untrained ViT: 35% with one copy, 73% with two) and shortens the plateau at chance that
  from-scratch ViTs sit on before they learn.
- **The patterns are left-right symmetric**, so the horizontal flip of the standard train
  pipeline never turns one class into another, and it keeps the mark on the grid (the flipped
  mark starts at 64 - 16 - x, a multiple of 8 when x is).
- **No colour shortcut.** Every pattern colours exactly 8 of its 16 2x2-px cells, and all
  colours (background, body, mark) are drawn independently of the class, so the mean colour
  and colour histogram of an image carry no class information. Any two patterns differ in at
  least 8 cells.

Images are written in the CUB-200-2011 on-disk layout, so the CUB loader reads them. Generation
is deterministic: each image draws from its own generator seeded by (seed, split, index), so
the same seed gives byte-identical files.
"""

from __future__ import annotations

import colorsys
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from .errors import DatasetLayoutError

logger = logging.getLogger(__name__)

# Bump when the drawing changes, so that an existing data/demo/ from an older version is rebuilt.
GENERATOR_VERSION = 2
INFO_FILE = "demo_info.json"
DEFAULT_DEMO_ROOT = Path("data") / "demo"

# The ten marks. Each row is a 4x4 grid of 2x2 px cells; '#' is drawn in the mark colour.
# They are the weight-4 words of the [8, 4] extended Hamming code laid on the left half of the
# grid and mirrored onto the right half (hence symmetric, 8 cells on, >= 8 cells apart); the
# four words that look like a plain edge or bar were left out.
MARKS: tuple[tuple[str, ...], ...] = (
    ("####", "....", "####", "...."),
    ("####", "....", "....", "####"),
    ("#..#", "#..#", ".##.", ".##."),
    ("#..#", ".##.", "#..#", ".##."),
    ("#..#", ".##.", ".##.", "#..#"),
    (".##.", "#..#", "#..#", ".##."),
    (".##.", "#..#", ".##.", "#..#"),
    (".##.", ".##.", "#..#", "#..#"),
    ("....", "####", "####", "...."),
    ("....", "####", "....", "####"),
)
MARK_SIZE = 8
_SPLIT_IDS = {"train": 1, "test": 2}


def check_counts(num_classes: int, mark_copies: int, train_per_class: int, test_per_class: int) -> None:
    """The checks every generated set's spec shares; a bad value raises ValueError."""
    if not 2 <= num_classes <= len(MARKS):
        raise ValueError(f"num_classes must be in [2, {len(MARKS)}], got {num_classes}")
    if mark_copies not in (1, 2):
        raise ValueError(f"mark_copies must be 1 or 2, got {mark_copies}")
    if train_per_class < 1 or test_per_class < 1:
        raise ValueError("train_per_class and test_per_class must be >= 1")


@dataclass(frozen=True)
class DemoSpec:
    """What the generator makes; stored next to the images so a changed spec is detected.

    Args:
        seed: master seed; the same seed gives byte-identical files.
        image_size: side of the square images, a multiple of ``MARK_SIZE``.
        train_per_class: training images per class.
        test_per_class: test images per class.
        num_classes: number of classes (at most ``len(MARKS)``).
        mark_copies: copies of the pattern side by side (2; 1 makes a harder set on which a
            small ViT sits at chance for several epochs before it learns).
    """

    seed: int = 0
    image_size: int = 64
    train_per_class: int = 300
    test_per_class: int = 100
    num_classes: int = 10
    mark_copies: int = 2
    version: int = GENERATOR_VERSION

    def __post_init__(self) -> None:
        check_counts(self.num_classes, self.mark_copies, self.train_per_class, self.test_per_class)
        if self.image_size % MARK_SIZE or self.image_size < 4 * MARK_SIZE:
            raise ValueError(
                f"image_size must be a multiple of {MARK_SIZE} and at least {4 * MARK_SIZE} "
                f"(the mark is snapped to the patch grid), got {self.image_size}"
            )

    def render(self, label: int, rng: np.random.Generator) -> np.ndarray:
        """One (image_size, image_size, 3) uint8 image of class ``label``, drawn from ``rng`` only."""
        return render_image(label, rng, self.image_size, self.mark_copies)


class SyntheticSpec(Protocol):
    """What ``generate_demo_dataset`` needs of a generated set's spec (a frozen dataclass)."""

    seed: int
    train_per_class: int
    test_per_class: int
    num_classes: int

    def render(self, label: int, rng: np.random.Generator) -> np.ndarray: ...


def class_names(num_classes: int) -> list[str]:
    """CUB-style class folder names ``001.mark_a`` ... (number prefix, as CUB's classes.txt)."""
    return [f"{i + 1:03d}.mark_{chr(ord('a') + i)}" for i in range(num_classes)]


def mark_mask(label: int) -> np.ndarray:
    """The (8, 8) boolean pixel mask of mark ``label`` (each grid cell is 2x2 px)."""
    cells = np.array([[ch == "#" for ch in row] for row in MARKS[label]], dtype=bool)
    return np.kron(cells, np.ones((2, 2), dtype=bool))


def random_colour(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> np.ndarray:
    """An RGB colour (0-255 floats) with uniform hue and saturation/value drawn from the ranges."""
    rgb = colorsys.hsv_to_rgb(rng.uniform(0.0, 1.0), rng.uniform(*sat), rng.uniform(*val))
    return np.array(rgb, dtype=np.float32) * 255.0


def texture(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Background: a base colour plus two coloured sine gratings of random period and angle."""
    image = np.broadcast_to(random_colour(rng, (0.2, 0.8), (0.3, 0.9)), (size, size, 3)).copy()
    for _ in range(2):
        theta = rng.uniform(0.0, np.pi)
        period = rng.uniform(5.0, 16.0)
        phase = rng.uniform(0.0, 2.0 * np.pi)
        wave = np.sin(2.0 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + phase)
        direction = rng.normal(size=3).astype(np.float32)
        direction *= rng.uniform(8.0, 25.0) / np.linalg.norm(direction)
        image += wave[..., None] * direction
    return image


def place_body(
    rng: np.random.Generator, size: int, copies: int
) -> tuple[int, int, float, float, float, float]:
    """Pick the mark's grid cell and a body ellipse that contains it.

    Returns (mark_x, mark_y, centre_x, centre_y, semi_axis_x, semi_axis_y), (mark_x, mark_y)
    being the top-left corner of the mark. The mark's cells are drawn uniformly from the grid
    away from the border; the body centre is offset randomly from the mark's centre as long as
    the whole mark stays inside the ellipse.
    """
    cells = size // MARK_SIZE
    width = MARK_SIZE * copies
    mark_x = int(rng.integers(1, cells - copies)) * MARK_SIZE
    mark_y = int(rng.integers(1, cells - 1)) * MARK_SIZE
    a, b = rng.uniform(11.0, 15.0), rng.uniform(8.0, 10.5)
    corners = ((0.0, 0.0), (width, 0.0), (0.0, MARK_SIZE), (width, MARK_SIZE))
    # Rejection sampling; it ends because a zero offset always fits these axis ranges
    # ((8/11)^2 + (4/8)^2 < 0.9), and it accepts within a few draws. Plain floats: numpy on
    # four corners costs more than the test (the hard set places several bodies per image).
    while True:
        cx = mark_x + width / 2 + rng.uniform(-a / 3, a / 3)
        cy = mark_y + MARK_SIZE / 2 + rng.uniform(-b / 3, b / 3)
        if all(((x + mark_x - cx) / a) ** 2 + ((y + mark_y - cy) / b) ** 2 <= 0.9 for x, y in corners):
            return mark_x, mark_y, cx, cy, a, b


def darker(rng: np.random.Generator, colour: np.ndarray) -> np.ndarray:
    """A much darker shade of ``colour``: the mark and eye colour, tied to the body, not the class.

    Always darker (never sometimes lighter): then the mark's pattern has the same sign in every
    image, which a freshly initialised ViT picks up far sooner (a linear probe on the
    patch-averaged image, what uniform attention sees, went from 47% to 84%).
    """
    return colour * rng.uniform(0.1, 0.3)


def draw_mark(image: np.ndarray, label: int, mark_x: int, mark_y: int, copies: int, ink: np.ndarray) -> None:
    """Paint ``copies`` side-by-side copies of mark ``label`` with top-left corner (mark_x, mark_y)."""
    for copy in range(copies):
        left = mark_x + copy * MARK_SIZE
        image[mark_y : mark_y + MARK_SIZE, left : left + MARK_SIZE][mark_mask(label)] = ink


def shaded(colour: np.ndarray, yy: np.ndarray, cy: float, b: float) -> np.ndarray:
    """``colour`` shaded from top to bottom of an ellipse (centre row ``cy``, vertical semi-axis
    ``b``), so a body is not a flat patch that only the mark breaks: (H, W, 3)."""
    return colour * (1.0 + 0.15 * (cy - yy) / b)[..., None]


def draw_bird(
    image: np.ndarray, label: int, rng: np.random.Generator, copies: int, yy: np.ndarray, xx: np.ndarray
) -> tuple[np.ndarray, int, int]:
    """Draw the bird carrying mark ``label`` into the float (H, W, 3) ``image`` in place.

    Returns the (H, W) mask of the pixels the bird covers (body, head, tail) and the top-left
    corner (mark_x, mark_y) of its mark. Draws from ``rng`` only, in a fixed order that does
    not depend on ``label``.
    """
    size = image.shape[0]
    mark_x, mark_y, cx, cy, a, b = place_body(rng, size, copies)
    body_colour = random_colour(rng, (0.3, 1.0), (0.55, 1.0))
    facing = 1.0 if rng.uniform() < 0.5 else -1.0

    body = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1.0
    head_r = rng.uniform(4.5, 6.5)
    head_x, head_y = cx + facing * (a + 0.3 * head_r), cy - 0.6 * b
    head = (xx - head_x) ** 2 + (yy - head_y) ** 2 <= head_r**2
    # Tail: a triangle widening away from the body on the side opposite the head.
    along = -facing * (xx - cx) - (a - 2.0)
    tail = (along >= 0) & (along <= rng.uniform(6.0, 9.0)) & (np.abs(yy - cy + 0.2 * b) <= 1.0 + 0.6 * along)
    covered = body | head | tail
    image[covered] = shaded(body_colour, yy, cy, b)[covered]

    # A 2x2 eye; clipping both ends keeps a head partly outside the image from wrapping around.
    eye_x, eye_y = int(round(head_x + facing * 0.35 * head_r)), int(round(head_y - 0.2 * head_r))
    x0, x1 = np.clip([eye_x - 1, eye_x + 1], 0, size)
    y0, y1 = np.clip([eye_y - 1, eye_y + 1], 0, size)
    image[y0:y1, x0:x1] = darker(rng, body_colour)

    draw_mark(image, label, mark_x, mark_y, copies, darker(rng, body_colour))
    return covered, mark_x, mark_y


def to_pixels(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Add sensor noise to the float ``image`` and round it to uint8."""
    image = image + rng.normal(0.0, 4.0, size=image.shape).astype(np.float32)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def render_image(label: int, rng: np.random.Generator, size: int, copies: int = 2) -> np.ndarray:
    """Draw one (size, size, 3) uint8 image of class ``label`` using ``rng`` only."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = texture(rng, size, yy, xx)
    draw_bird(image, label, rng, copies, yy, xx)
    return to_pixels(image, rng)


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """One generator per image, so files do not depend on generation order."""
    return np.random.default_rng([seed, _SPLIT_IDS[split], index])


def _write_split_files(root: Path, records: list[tuple[str, int, int]], names: list[str]) -> None:
    """Write the four CUB index files (1-based ids and labels, 1 = training image)."""
    (root / "classes.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(names)))
    (root / "images.txt").write_text("".join(f"{i + 1} {p}\n" for i, (p, _, _) in enumerate(records)))
    (root / "image_class_labels.txt").write_text(
        "".join(f"{i + 1} {y + 1}\n" for i, (_, y, _) in enumerate(records))
    )
    (root / "train_test_split.txt").write_text(
        "".join(f"{i + 1} {t}\n" for i, (_, _, t) in enumerate(records))
    )


def write_demo_dataset(root: Path, spec: SyntheticSpec) -> None:
    """Generate the set ``spec`` describes into ``root`` (which must not hold files yet), CUB layout."""
    names = class_names(spec.num_classes)
    records: list[tuple[str, int, int]] = []
    for split, per_class in (("train", spec.train_per_class), ("test", spec.test_per_class)):
        for index in range(per_class * spec.num_classes):
            label = index % spec.num_classes
            rel = f"{names[label]}/{split}_{index:05d}.jpg"  # relative to images/, as in CUB
            path = root / "images" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            rng = _image_rng(spec.seed, split, index)
            pixels = spec.render(label, rng)
            # 4:4:4 chroma and high quality keep the 2 px cells of the mark crisp.
            Image.fromarray(pixels).save(path, quality=95, subsampling=0)
            records.append((rel, label, 1 if split == "train" else 0))
    _write_split_files(root, records, names)
    (root / INFO_FILE).write_text(json.dumps(asdict(spec), indent=2) + "\n")


def _read_info(root: Path) -> dict | None:
    """The spec recorded in ``root`` as a dict, or None when there is no record."""
    info = root / INFO_FILE
    if not info.is_file():
        return None
    try:
        return json.loads(info.read_text())
    except json.JSONDecodeError as err:
        raise DatasetLayoutError(
            f"{info} is not valid JSON ({err}); delete {root} to have it regenerated"
        ) from err


def generate_demo_dataset(
    root: str | os.PathLike[str] = DEFAULT_DEMO_ROOT, spec: SyntheticSpec | None = None
) -> Path:
    """Make sure the generated set described by ``spec`` exists in ``root``; generate it if not.

    Called on first use by ``build_dataset('synthetic', ...)`` (and 'synthetic-hard', whose
    ``HardSpec`` draws the images). It is written to a temporary
    sibling directory and renamed into place, so an interrupted run never leaves a half-written
    set, and concurrent processes (DDP ranks) do not corrupt each other. A ``root`` holding an
    older or different demo set is replaced; a ``root`` holding anything else is an error (we
    never delete files we did not make).

    Args:
        root: target directory (default ``data/demo`` relative to the working directory).
        spec: what to generate (a ``DemoSpec`` or ``HardSpec``); the default is the demo's
            ``DemoSpec()``: 10 classes, 300 train and 100 test images per class, 64 px, seed 0.

    Returns:
        The root path of the generated set (CUB layout).
    """
    return generate_once(root, spec or DemoSpec(), write_demo_dataset, "synthetic", "the demo dataset")


def generate_once(
    root: str | os.PathLike[str], spec: Any, write: Callable[[Path, Any], None], dataset: str, what: str
) -> Path:
    """``write(tmp, spec)`` into a temporary folder next to ``root`` and rename it into place,
    unless ``root`` already holds the set of exactly this spec (its ``demo_info.json``); a folder
    with other files and no info file is refused rather than overwritten.

    Args:
        spec: a dataclass; its fields are recorded in ``demo_info.json``.
        dataset: the ``data.dataset`` name, for the error message. what: for the log.
    """
    root = Path(root)
    if root.exists():
        existing = _read_info(root)
        if existing == asdict(spec):
            return root
        if existing is None and any(root.iterdir()):
            raise DatasetLayoutError(
                f"{root} exists and holds files but no {INFO_FILE}, so it is not a demo set made by "
                f"this package. Point the {dataset} dataset at an empty or new directory."
            )
        logger.info("%s in %s was made with %s; regenerating with %s", what, root, existing, spec)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        logger.info("Generating %s into %s", what, root)
        write(tmp, spec)
        _replace_dir(tmp, root, spec)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return root


def _replace_dir(src: Path, dst: Path, spec: SyntheticSpec) -> None:
    """Move ``src`` to ``dst``, replacing an old demo set; tolerate a concurrent writer."""
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / dst.name)
        shutil.rmtree(old)
    try:
        os.replace(src, dst)
    except OSError:
        # Another process (a DDP rank) renamed its copy into place first: fine if it is this set.
        if _read_info(dst) != asdict(spec):
            raise
