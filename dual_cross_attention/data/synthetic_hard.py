"""The hard demo set: the class is decided by one mark among look-alike marks placed at random.

Each image is a demo image (``synthetic.py``: a bird carrying the class's mark on its body, over
a textured background) plus ``distractors`` decoys (one by default): headless, tailless bodies
(the same ellipse distribution, colour distribution, shading and ink) each carrying a mark of a
class drawn at random, independently of the image's class. Only the mark on the bird (the body
with a head, an eye and a tail) decides the class. A patch of the bird's mark and a patch of a
decoy's mark look alike; telling them apart takes the context around them, which is what
DCAL's local-region attention is meant to find.

What this does to a classifier that only collects the marks it sees (a bag of patterns): it
knows the true pattern is among the ``distractors + 1`` it found, and nothing about which. With
ten classes the best such guess is right 55% of the time with one decoy and 40% with two
(chance: 10%); anything above that needs the context. With the demo's model and budget
(configs/demo_hard.yaml: 6 epochs, seed 0, 2-core CPU) a plain SA ViT ended at that level,
56.3% test top-1 with one decoy (41.4% with two; chance 10%, top-5 100%).

Everything else is as in the demo, for the same measured reasons: the marks sit on the 8 px
patch grid, are drawn twice side by side, are left-right symmetric, and all colours are drawn
independently of the class (no colour shortcut); positions are uniform (no position shortcut).
``tests/test_data_synthetic_hard.py`` checks both with simple classifiers.

The images are written in the CUB-200-2011 layout by the demo's generator (temporary directory,
atomic rename, spec recorded in ``demo_info.json``), deterministically: one generator per image
seeded by (seed, split, index).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .synthetic import (
    MARK_SIZE,
    check_counts,
    darker,
    draw_bird,
    draw_mark,
    place_body,
    random_colour,
    shaded,
    texture,
    to_pixels,
)

# Bump when the drawing changes, so that an existing set from an older version is rebuilt.
GENERATOR_VERSION = 1
DEFAULT_HARD_ROOT = Path("data") / "demo_hard"
DECOY_MARGIN = 2.0  # px of background kept between a decoy and the bird or another decoy
MAX_LAYOUT_TRIES = 200


@dataclass(frozen=True)
class HardLayout:
    """Where an image's marks are: the bird's (top-left corners, px) and the decoys' with their patterns."""

    bird_mark: tuple[int, int]
    decoy_marks: tuple[tuple[int, int], ...]
    decoy_labels: tuple[int, ...]


@dataclass(frozen=True)
class HardSpec:
    """What the hard generator makes; stored next to the images so a changed spec is detected.

    Args:
        seed: master seed; the same seed gives byte-identical files.
        image_size: side of the square images, a multiple of ``MARK_SIZE`` and at least 64 (the
            bird and its decoys must fit side by side).
        train_per_class: training images per class.
        test_per_class: test images per class.
        num_classes: number of classes (at most 10, one per mark).
        distractors: decoys per image, each with a mark drawn uniformly from all classes.
        mark_copies: copies of each pattern side by side (as the demo's).
    """

    seed: int = 0
    image_size: int = 64
    train_per_class: int = 300
    test_per_class: int = 100
    num_classes: int = 10
    distractors: int = 1
    mark_copies: int = 2
    version: int = GENERATOR_VERSION

    def __post_init__(self) -> None:
        check_counts(self.num_classes, self.mark_copies, self.train_per_class, self.test_per_class)
        if self.image_size % MARK_SIZE or self.image_size < 8 * MARK_SIZE:
            raise ValueError(
                f"image_size must be a multiple of {MARK_SIZE} and at least {8 * MARK_SIZE} "
                f"(the bird and its decoys side by side), got {self.image_size}"
            )
        if not 0 <= self.distractors <= 3:
            raise ValueError(f"distractors must be in [0, 3], got {self.distractors}")

    def render(self, label: int, rng: np.random.Generator) -> np.ndarray:
        """One (image_size, image_size, 3) uint8 image of class ``label``, drawn from ``rng`` only."""
        return render_hard_image(label, rng, self)[0]


def _ellipse(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    return ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1.0


def _place_decoys(
    rng: np.random.Generator, spec: HardSpec, occupied: np.ndarray, yy: np.ndarray, xx: np.ndarray
) -> list[tuple[int, int, float, float, float, float]] | None:
    """Decoy bodies (as ``place_body`` returns them) clear of ``occupied`` and of each other by
    ``DECOY_MARGIN``; None when one does not fit after a few draws (the caller starts over)."""
    occupied = occupied.copy()
    decoys = []
    for _ in range(spec.distractors):
        for _ in range(20):
            mark_x, mark_y, cx, cy, a, b = place_body(rng, spec.image_size, spec.mark_copies)
            if not (_ellipse(xx, yy, cx, cy, a + DECOY_MARGIN, b + DECOY_MARGIN) & occupied).any():
                break
        else:
            return None
        occupied |= _ellipse(xx, yy, cx, cy, a, b)
        decoys.append((mark_x, mark_y, cx, cy, a, b))
    return decoys


def render_hard_image(label: int, rng: np.random.Generator, spec: HardSpec) -> tuple[np.ndarray, HardLayout]:
    """Draw one (size, size, 3) uint8 image of class ``label`` using ``rng`` only, and its layout.

    Every draw is made in an order that does not depend on ``label``, so two labels with the same
    generator state give images that differ only in the bird's mark.
    """
    size = spec.image_size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(MAX_LAYOUT_TRIES):
        image = texture(rng, size, yy, xx)
        bird, bird_x, bird_y = draw_bird(image, label, rng, spec.mark_copies, yy, xx)
        decoys = _place_decoys(rng, spec, bird, yy, xx)
        if decoys is not None:
            break
    else:
        raise RuntimeError(f"no room for {spec.distractors} decoys next to the bird in {size} px images")
    labels = []
    for mark_x, mark_y, cx, cy, a, b in decoys:
        colour = random_colour(rng, (0.3, 1.0), (0.55, 1.0))
        body = _ellipse(xx, yy, cx, cy, a, b)
        image[body] = shaded(colour, yy, cy, b)[body]
        labels.append(int(rng.integers(spec.num_classes)))
        draw_mark(image, labels[-1], mark_x, mark_y, spec.mark_copies, darker(rng, colour))
    layout = HardLayout(
        bird_mark=(bird_x, bird_y),
        decoy_marks=tuple((d[0], d[1]) for d in decoys),
        decoy_labels=tuple(labels),
    )
    return to_pixels(image, rng), layout
