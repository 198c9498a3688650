"""The built-in Re-ID demo set: look-alike synthetic persons seen by several cameras, Market-1501 layout.

Every image shows one standing figure (head, torso with arms, two legs) over a textured
background. An identity is a fixed combination of four discrete attributes, the ``Look``:

- ``colour``: the torso colour, one of ``PALETTE`` (3);
- ``mark``: the pattern on the torso, one of the first six of ``synthetic.MARKS``, drawn twice
  side by side (a 16x8 px detail, as in the FGVC demo);
- ``zone``: where the mark sits on the torso, ``ZONES`` = chest or belly (2);
- ``accessory``: ``ACCESSORIES`` = a hat or a bag at the hip (2).

That gives ``NUM_LOOKS`` = 72 combinations, and the default set uses all of them (42 training
and 30 test identities), each for exactly one identity. Everything else is drawn anew for each
image, so an identity is recognisable across images and cameras only from its attributes:
position and size of the figure, head size, skin, trouser, hat and bag colours, the side the bag
hangs on, the background (a camera-dependent base hue, a ground band, two sine gratings),
lighting (brightness and a gradient), small noise on the torso colour, and sensor noise. Each
camera adds its own colour cast, brightness and background hue (``camera_style``), so the same
person looks different in every camera.

**Look-alikes.** The identities are the full product of a few small attribute sets, so most
share most of their look. In the full set of 72, each identity has 9 others that differ from it
in exactly one attribute (5 of them only in the mark pattern) and 25 that differ in two: 48% of
all identity pairs differ in at most two of the four attributes. Looks are dealt round-robin
over the 12 groups of the same (colour, zone, accessory), first to the test identities, then to
the training ones, so in the default split every identity has at least one identity in its own
split (train or test) that differs from it only in the mark, and a query's gallery always holds
such a look-alike. Colour, silhouette and accessory alone cannot tell those apart; the 16x8 px
mark can. The nuisances swamp the identity in raw pixels: ranking the default gallery by the
Euclidean distance of the pixels gives 6.2% mAP and 1.7% rank-1, about chance (below).

**Distractors and junk**, as in Market-1501's ``bounding_box_test``: distractors (pid 0) are
persons wearing one of the four marks no identity wears (``DISTRACTOR_MARKS``), so each one is a
non-match to every query yet a look-alike of several; junk (pid -1) are detections with nobody
in them (background only), which the standard protocol leaves out.

**Patch grid.** As in the FGVC demo (``synthetic.py``), the mark is snapped to the 8 px grid
of a patch-8 ViT: its top-left corner is a multiple of 8 in both coordinates, and the figure is
placed around it. The marks are left-right symmetric and the mark's column is centred in the
default 32 px width, so a horizontal flip keeps both the identity and the alignment. Train at
the image size without padding and random crop (``reid.pad: 0``) to keep the mark on the grid.

**Default set** (``ReIDDemoSpec()``, 64 x 32 px, 3 cameras; 2.6 MB, written in about 2 s):

- ``bounding_box_train/``: 42 identities x 3 cameras x 3 = 378 images;
- ``query/``: 30 identities x 2 cameras (rotating over the 3) x 1 = 60 images;
- ``bounding_box_test/``: 30 identities x 3 cameras x 2 = 180 images, 8 distractors (pid 0)
  and 4 junk (pid -1): 192 files, 188 in the evaluated gallery.

**Chance levels** of the default test set (``chance_levels``), the standard protocol (a query's
gallery leaves out its own identity in its own camera, and the junk): every query keeps
n = 188 - 2 = 186 gallery images, m = 4 of them true matches (2 images in each of the two other
cameras). A random ranking puts a true match first with probability m / n, so the expected
rank-1 is the mean of m / n over the queries: 4 / 186 = 2.15%. Its expected average precision
over a random permutation is H_n / n + (m - 1)(n - H_n) / (n (n - 1)), H_n the n-th harmonic
number (derived in ``_expected_random_ap``): 4.69% mAP. ``tests/test_data_synthetic_reid.py``
checks both against a simulation of random rankings.

File names follow Market-1501: ``{pid:04d}_c{camera}s1_{frame:06d}_{box:02d}.jpg`` (junk as
``-1_c...``, distractors as ``0000_c...``), cameras numbered from 1, frames unique over the
whole set. Generation is deterministic: each image draws from its own generator seeded by
(seed, folder, pid, camera, box), so the same spec gives byte-identical files. It is written to
a temporary directory and renamed into place, and the spec is recorded in ``demo_info.json``,
exactly as for the FGVC demo: a set made from another spec or an older ``GENERATOR_VERSION`` is
replaced, a folder holding anything else is an error.
"""

from __future__ import annotations

import colorsys
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .synthetic import (
    INFO_FILE,
    MARK_SIZE,
    darker,
    draw_mark,
    generate_once,
    random_colour,
    to_pixels,
)

logger = logging.getLogger(__name__)

# Bump when the drawing or the layout changes, so that an existing data/demo_reid/ is rebuilt.
GENERATOR_VERSION = 1
DEFAULT_REID_ROOT = Path("data") / "demo_reid"

PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (190, 40, 40)),
    ("green", (40, 150, 55)),
    ("blue", (45, 70, 195)),
)
IDENTITY_MARKS = (0, 1, 2, 3, 4, 5)  # indices into MARKS that identities wear
DISTRACTOR_MARKS = (6, 7, 8, 9)  # worn only by distractors (pid 0)
ZONES = ("chest", "belly")
ACCESSORIES = ("hat", "bag")
NUM_LOOKS = len(PALETTE) * len(IDENTITY_MARKS) * len(ZONES) * len(ACCESSORIES)

FOLDERS = ("bounding_box_train", "query", "bounding_box_test")
_FOLDER_STREAMS = {"bounding_box_train": 1, "query": 2, "bounding_box_test": 3}
_IDENTITY_STREAM, _DISTRACTOR_STREAM, _CAMERA_STREAM = 10, 11, 12
_SKIN = np.array((230.0, 185.0, 150.0), dtype=np.float32)
_HEAD_TOP_MIN = 10  # smallest torso top row (px) that keeps the head (radius <= 4.6) inside the image
_MIN_LEGS = 10  # rows of legs kept visible below the torso
_MARK_COPIES = 2


@dataclass(frozen=True)
class Look:
    """The attributes that make an identity: indices into PALETTE, MARKS, ZONES and ACCESSORIES."""

    colour: int
    mark: int
    zone: int
    accessory: int


@dataclass(frozen=True)
class Identity:
    """One identity of the demo: its Market pid, its split ('train' or 'test') and its look."""

    pid: int
    split: str
    look: Look


@dataclass(frozen=True)
class PlannedImage:
    """One file of the set: folder, pid (0 distractor, -1 junk), 1-based camera, frame, box, look."""

    folder: str
    pid: int
    camera: int
    frame: int
    box: int
    look: Look | None  # None for junk (nobody in the image)

    @property
    def name(self) -> str:
        pid = "-1" if self.pid == -1 else f"{self.pid:04d}"
        return f"{pid}_c{self.camera}s1_{self.frame:06d}_{self.box:02d}.jpg"


@dataclass(frozen=True)
class CameraStyle:
    """What a camera does to every image it takes: per-channel gain (cast and brightness) and the
    base hue of its backgrounds."""

    gain: tuple[float, float, float]
    background_hue: float


@dataclass(frozen=True)
class ChanceLevels:
    """Expected rank-1 and mAP (percent) of a random ranking under the standard protocol."""

    rank1: float
    mAP: float


@dataclass(frozen=True)
class ReIDDemoSpec:
    """What the Re-ID demo generator makes; stored next to the images so a changed spec is detected.

    Args:
        seed: master seed; the same seed gives byte-identical files.
        height: image height in px, a multiple of ``MARK_SIZE`` and at least 64.
        width: image width in px, a multiple of ``MARK_SIZE`` and at least 32 (the figure keeps
            its size; a larger image only leaves more room around it).
        num_train_ids: training identities.
        num_test_ids: test identities (query and gallery), disjoint from the training ones;
            ``num_train_ids + num_test_ids`` is at most ``NUM_LOOKS`` (one look per identity).
        num_cameras: cameras (2..9); each identity is seen by all of them.
        train_per_camera: training images per identity and camera.
        query_cameras: queries per test identity, one in each of this many cameras (rotating
            over the cameras from one identity to the next).
        gallery_per_camera: gallery images per test identity and camera.
        distractors: gallery images of pid 0 (persons no query matches).
        junk: gallery images of pid -1 (no person; left out by the protocol).
    """

    seed: int = 0
    height: int = 64
    width: int = 32
    num_train_ids: int = 42
    num_test_ids: int = 30
    num_cameras: int = 3
    train_per_camera: int = 3
    query_cameras: int = 2
    gallery_per_camera: int = 2
    distractors: int = 8
    junk: int = 4
    version: int = GENERATOR_VERSION

    def __post_init__(self) -> None:
        for name, value, low in (
            ("height", self.height, 8 * MARK_SIZE),
            ("width", self.width, 4 * MARK_SIZE),
        ):
            if value % MARK_SIZE or value < low:
                raise ValueError(
                    f"{name} must be a multiple of {MARK_SIZE} and at least {low} (the mark is snapped "
                    f"to the patch grid and the figure must fit), got {value}"
                )
        if self.num_train_ids < 1 or self.num_test_ids < 1:
            raise ValueError("num_train_ids and num_test_ids must be >= 1")
        if self.num_train_ids + self.num_test_ids > NUM_LOOKS:
            raise ValueError(
                f"num_train_ids + num_test_ids must be at most {NUM_LOOKS} (each identity has its own "
                f"combination of attributes), got {self.num_train_ids} + {self.num_test_ids}"
            )
        if not 2 <= self.num_cameras <= 9:
            raise ValueError(f"num_cameras must be in [2, 9], got {self.num_cameras}")
        if not 1 <= self.query_cameras <= self.num_cameras:
            raise ValueError(
                f"query_cameras must be in [1, num_cameras={self.num_cameras}], got {self.query_cameras}"
            )
        if self.train_per_camera < 1 or self.gallery_per_camera < 1:
            raise ValueError("train_per_camera and gallery_per_camera must be >= 1")
        if self.distractors < 0 or self.junk < 0:
            raise ValueError("distractors and junk must be >= 0")


def all_looks() -> list[list[Look]]:
    """The NUM_LOOKS looks in groups of the same (colour, zone, accessory), differing only in the mark."""
    return [
        [Look(colour, mark, zone, accessory) for mark in IDENTITY_MARKS]
        for colour in range(len(PALETTE))
        for zone in range(len(ZONES))
        for accessory in range(len(ACCESSORIES))
    ]


def identities(spec: ReIDDemoSpec) -> tuple[Identity, ...]:
    """The identities of ``spec``, training ones first, each in pid order.

    Looks are dealt round-robin over the mark-only groups of ``all_looks`` (groups and marks in a
    seeded order): first to the test split, then to the training split, so each split spreads
    over all groups and holds mark-only look-alikes. Pids are a seeded permutation of
    1..(num_train_ids + num_test_ids), so training and test pids interleave as in Market-1501.
    """
    rng = np.random.default_rng([spec.seed, _IDENTITY_STREAM])
    groups = all_looks()
    queues = [[groups[g][m] for m in rng.permutation(len(groups[g]))] for g in rng.permutation(len(groups))]
    dealt = [queue[i] for i in range(len(IDENTITY_MARKS)) for queue in queues]
    total = spec.num_test_ids + spec.num_train_ids
    pids = [int(p) for p in rng.permutation(np.arange(1, total + 1))]
    dealt_splits = ["test"] * spec.num_test_ids + ["train"] * spec.num_train_ids
    ids = [Identity(p, split, look) for p, split, look in zip(pids, dealt_splits, dealt[:total], strict=True)]
    train = [i for i in ids if i.split == "train"]
    test = [i for i in ids if i.split == "test"]
    return tuple(sorted(train, key=lambda i: i.pid) + sorted(test, key=lambda i: i.pid))


def _distractor_look(seed: int, index: int) -> Look:
    rng = np.random.default_rng([seed, _DISTRACTOR_STREAM, index])
    return Look(
        colour=int(rng.integers(len(PALETTE))),
        mark=DISTRACTOR_MARKS[int(rng.integers(len(DISTRACTOR_MARKS)))],
        zone=int(rng.integers(len(ZONES))),
        accessory=int(rng.integers(len(ACCESSORIES))),
    )


def plan_images(spec: ReIDDemoSpec) -> tuple[PlannedImage, ...]:
    """Every file of the set, in writing order; frames are numbered 1, 2, ... over all of them."""
    rows: list[tuple[str, int, int, int, Look | None]] = []  # (folder, pid, camera, box, look)
    cameras = range(1, spec.num_cameras + 1)
    ids = identities(spec)
    for ident in (i for i in ids if i.split == "train"):
        rows += [
            ("bounding_box_train", ident.pid, c, k, ident.look)
            for c in cameras
            for k in range(spec.train_per_camera)
        ]
    for j, ident in enumerate(i for i in ids if i.split == "test"):
        query_cams = sorted((j + q) % spec.num_cameras + 1 for q in range(spec.query_cameras))
        rows += [("query", ident.pid, c, 0, ident.look) for c in query_cams]
        rows += [
            ("bounding_box_test", ident.pid, c, k, ident.look)
            for c in cameras
            for k in range(spec.gallery_per_camera)
        ]
    # Distractors and junk spread over the cameras; box numbers count them within a camera.
    for j in range(spec.distractors):
        look = _distractor_look(spec.seed, j)
        rows.append(("bounding_box_test", 0, j % spec.num_cameras + 1, j // spec.num_cameras, look))
    for j in range(spec.junk):
        rows.append(("bounding_box_test", -1, j % spec.num_cameras + 1, j // spec.num_cameras, None))
    return tuple(
        PlannedImage(f, pid, c, frame, k, look) for frame, (f, pid, c, k, look) in enumerate(rows, start=1)
    )


def camera_style(seed: int, camera: int, num_cameras: int) -> CameraStyle:
    """Camera ``camera`` (1-based) of ``num_cameras``: casts on evenly spread colour directions and
    brightness levels spread over [0.85, 1.15] in a seeded order, so no two cameras look alike."""
    rng = np.random.default_rng([seed, _CAMERA_STREAM, num_cameras])
    brightness = np.linspace(0.85, 1.15, num_cameras)[rng.permutation(num_cameras)][camera - 1]
    angle = 2.0 * np.pi * (camera - 1) / num_cameras + rng.uniform(-0.3, 0.3)
    cast = 0.12 * np.cos(angle - 2.0 * np.pi * np.arange(3) / 3)  # a tint towards one hue
    gain = brightness * (1.0 + cast)
    return CameraStyle(gain=tuple(float(g) for g in gain), background_hue=float(angle / (2 * np.pi) % 1.0))


def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    """The RGB colour (0-255 float32) of an HSV one (components in [0, 1])."""
    return np.array(colorsys.hsv_to_rgb(hue, saturation, value), np.float32) * 255.0


def _background(rng: np.random.Generator, style: CameraStyle, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A base colour near the camera's hue, a darker ground band, two coloured sine gratings: (H, W, 3)."""
    hue = (style.background_hue + rng.uniform(-0.06, 0.06)) % 1.0
    base = _hsv(hue, rng.uniform(0.1, 0.5), rng.uniform(0.35, 0.8))
    image = np.broadcast_to(base, (*yy.shape, 3)).copy()
    horizon = rng.uniform(0.55, 0.85) * yy.shape[0]
    image[yy >= horizon] *= np.float32(rng.uniform(0.6, 0.9))
    for _ in range(2):
        theta, period, phase = rng.uniform(0.0, np.pi), rng.uniform(5.0, 16.0), rng.uniform(0.0, 2.0 * np.pi)
        wave = np.sin(2.0 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + phase)
        direction = rng.normal(size=3).astype(np.float32)
        image += wave[..., None] * direction * np.float32(rng.uniform(6.0, 20.0) / np.linalg.norm(direction))
    return image


def _mark_corner(
    rng: np.random.Generator, zone: int, torso_h: int, offset: int, height: int, width: int
) -> tuple[int, int, int]:
    """The mark's grid-aligned top-left corner and the torso's top row for a mark ``offset`` rows
    below the torso's top (chest) or above its bottom (belly): (mark_x, mark_y, torso_top)."""
    mark_x = int(rng.integers(1, width // MARK_SIZE - 2)) * MARK_SIZE  # torso and arms fit beside it
    depth = offset if zone == 0 else torso_h - MARK_SIZE - offset
    rows = [
        y for y in range(0, height, MARK_SIZE) if _HEAD_TOP_MIN <= y - depth <= height - torso_h - _MIN_LEGS
    ]
    mark_y = rows[int(rng.integers(len(rows)))]
    return mark_x, mark_y, mark_y - depth


def _draw_person(
    image: np.ndarray, look: Look, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray
) -> None:
    """Draw the figure wearing ``look`` into the float (H, W, 3) ``image`` in place.

    The draws from ``rng`` come in a fixed order whatever the look, and nothing is drawn over
    the mark, so two looks that differ only in the mark give images that differ only there.
    """
    height, width = yy.shape
    head_r, half_w = rng.uniform(3.8, 4.6), rng.uniform(10.5, 11.5)
    torso_h, offset = int(rng.integers(22, 26)), int(rng.integers(2, 4))
    dx = rng.uniform(-1.5, 1.5)  # torso centre relative to the mark's centre
    mark_x, mark_y, top = _mark_corner(rng, look.zone, torso_h, offset, height, width)
    torso = np.array(PALETTE[look.colour][1], np.float32) * rng.uniform(0.88, 1.1) + rng.normal(0.0, 6.0, 3)
    skin = _SKIN * rng.uniform(0.55, 1.05)
    trousers = random_colour(rng, (0.0, 0.35), (0.12, 0.45))
    hat = random_colour(rng, (0.0, 0.3), (0.05, 0.22))
    bag = _hsv(rng.uniform(0.04, 0.12), rng.uniform(0.4, 0.7), rng.uniform(0.3, 0.55))  # brown
    bag_side = 1.0 if rng.uniform() < 0.5 else -1.0
    leg_len, leg_w, gap = rng.uniform(16.0, 22.0), rng.uniform(4.0, 5.5), rng.uniform(1.0, 2.5)
    arm_w, arm_len = rng.uniform(2.5, 3.5), torso_h - 2 + rng.uniform(0.0, 4.0)
    head_dx = rng.uniform(-1.0, 1.0)

    cx, bottom = mark_x + MARK_SIZE + dx, top + torso_h
    side = np.abs(xx - cx)
    # Cylinder-like shading across, light from above: the torso is not a flat patch.
    shade = (
        (1.0 - 0.2 * ((xx - cx) / half_w) ** 2) * (1.0 + 0.15 * (top + torso_h / 2 - yy) / (torso_h / 2))
    )[..., None]
    legs = (yy >= bottom - 1) & (yy < bottom + leg_len) & (side >= gap / 2) & (side <= gap / 2 + leg_w)
    image[legs] = trousers
    image[legs & (yy >= bottom + leg_len - 2)] = trousers * 0.4  # shoes
    arms = (side > half_w) & (side <= half_w + arm_w) & (yy >= top + 1) & (yy < top + arm_len)
    image[arms] = (torso * 0.85 * shade)[arms]
    corners = (side > half_w - 2) & ((yy < top + 2) | (yy >= bottom - 2))
    body = (side <= half_w) & (yy >= top) & (yy < bottom) & ~corners
    image[body] = (torso * shade)[body]
    hx, hy = cx + head_dx, top - head_r + 1.0
    head = (xx - hx) ** 2 + (yy - hy) ** 2 <= head_r**2
    image[head] = skin
    if ACCESSORIES[look.accessory] == "hat":
        brim = hy - 0.2 * head_r
        crown = head & (yy < brim)
        image[crown | ((np.abs(xx - hx) <= head_r + 1.2) & (yy >= brim - 1.0) & (yy < brim + 0.5))] = hat
    else:
        # Clear of the mark's columns (|x - cx| <= 9.5 there, half_w - 0.5 >= 10), though the mark
        # is drawn last anyway; the bag hangs on either side, so a flip keeps it a bag.
        reach = bag_side * (xx - cx)
        image[(reach >= half_w - 0.5) & (reach <= half_w + 5) & (yy >= bottom - 7) & (yy < bottom + 2)] = bag
    draw_mark(image, look.mark, mark_x, mark_y, _MARK_COPIES, darker(rng, torso))


def render_reid_image(
    look: Look | None, rng: np.random.Generator, style: CameraStyle, height: int, width: int
) -> np.ndarray:
    """One (height, width, 3) uint8 image of a person wearing ``look`` (None: junk, nobody) seen
    by a camera of ``style``, drawn from ``rng`` only."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = _background(rng, style, yy, xx)
    if look is not None:
        _draw_person(image, look, rng, yy, xx)
    light = rng.uniform(0.8, 1.15) * (
        1.0 + rng.uniform(-0.25, 0.25) * (xx / width - 0.5) + rng.uniform(-0.25, 0.25) * (yy / height - 0.5)
    )
    image = image * light[..., None] * np.array(style.gain, np.float32)
    return to_pixels(image, rng)


def image_rng(seed: int, image: PlannedImage) -> np.random.Generator:
    """One generator per image, so files do not depend on generation order (pid + 1 >= 0 for junk)."""
    return np.random.default_rng(
        [seed, _FOLDER_STREAMS[image.folder], image.pid + 1, image.camera, image.box]
    )


def write_reid_demo(root: Path, spec: ReIDDemoSpec) -> None:
    """Generate the set ``spec`` describes into ``root`` (which must not hold files yet)."""
    styles = {c: camera_style(spec.seed, c, spec.num_cameras) for c in range(1, spec.num_cameras + 1)}
    for folder in FOLDERS:
        (root / folder).mkdir(parents=True, exist_ok=True)
    for image in plan_images(spec):
        pixels = render_reid_image(
            image.look, image_rng(spec.seed, image), styles[image.camera], spec.height, spec.width
        )
        # 4:4:4 chroma and high quality keep the 2 px cells of the mark crisp.
        Image.fromarray(pixels).save(root / image.folder / image.name, quality=95, subsampling=0)
    (root / INFO_FILE).write_text(json.dumps(asdict(spec), indent=2) + "\n")


def generate_reid_demo(
    root: str | os.PathLike[str] = DEFAULT_REID_ROOT, spec: ReIDDemoSpec | None = None
) -> Path:
    """Make sure the Re-ID demo set described by ``spec`` exists in ``root``; generate it if not.

    Written to a temporary sibling directory and renamed into place, so an interrupted run never
    leaves a half-written set and concurrent processes (DDP ranks) do not corrupt each other. A
    ``root`` holding a set made from another spec or generator version is replaced; a ``root``
    holding anything else is an error (we never delete files we did not make).

    Args:
        root: target directory (default ``data/demo_reid`` relative to the working directory).
        spec: what to generate; default ``ReIDDemoSpec()`` (see the module docstring for its counts).

    Returns:
        The root path of the generated set (Market-1501 layout).
    """
    return generate_once(
        root, spec or ReIDDemoSpec(), write_reid_demo, "synthetic-reid", "the Re-ID demo set"
    )


def _expected_random_ap(n: int, m: int) -> float:
    """E[AP] of a uniformly random ranking of ``n`` items of which ``m`` are relevant.

    AP = (1/m) sum over relevant j of (1/r_j) * #{relevant i: r_i <= r_j}, r the ranks. With r_j
    uniform on 1..n, E[1/r_j] = H_n / n, and for i != j, P(r_i < r_j | r_j = r) = (r-1)/(n-1),
    so E[1{r_i < r_j} / r_j] = (1/n) sum_r (r-1) / ((n-1) r) = (n - H_n) / (n (n-1)). Summing
    the m terms and the m (m-1) pairs and dividing by m gives the expression returned.
    """
    harmonic = float(np.sum(1.0 / np.arange(1, n + 1)))
    return harmonic / n + (m - 1) * (n - harmonic) / (n * (n - 1)) if n > 1 else 1.0


def chance_levels(spec: ReIDDemoSpec | None = None) -> ChanceLevels:
    """Expected rank-1 and mAP (percent) of a random ranking on the test set of ``spec``, exactly.

    Per query, the gallery is the protocol's: junk and the query's identity in its own camera
    left out, distractors kept. rank-1 is the mean over queries of m / n and mAP the mean of
    ``_expected_random_ap(n, m)`` (m true matches among n gallery images); queries without a
    true match are left out, as the metric does.
    """
    spec = spec or ReIDDemoSpec()
    images = plan_images(spec)
    gallery = [(i.pid, i.camera) for i in images if i.folder == "bounding_box_test" and i.pid >= 0]
    rank1, ap = [], []
    for query in (i for i in images if i.folder == "query"):
        kept = [pid for pid, cam in gallery if not (pid == query.pid and cam == query.camera)]
        m = kept.count(query.pid)
        if m:
            rank1.append(m / len(kept))
            ap.append(_expected_random_ap(len(kept), m))
    return ChanceLevels(rank1=100.0 * float(np.mean(rank1)), mAP=100.0 * float(np.mean(ap)))
