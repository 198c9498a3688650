"""Decoding images once, as RGB, with errors that name the file.

CUB has grayscale images, some web-scraped sets have CMYK JPEGs or RGBA/palette PNGs; the model
always wants 3 channels. Converting here, right after decoding, means the transforms and the
model never see another mode.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import CorruptImageError

logger = logging.getLogger(__name__)

# What PIL raises on a file it cannot decode: unidentified or truncated files (OSError), bad
# headers in some plugins (SyntaxError, ValueError, EOFError) and absurd sizes.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; alpha is dropped (the photos we train on are opaque)."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        # Going through RGBA resolves palette transparency the way PIL recommends.
        image = image.convert("RGBA")
    return image.convert("RGB")


def load_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode ``path`` into an (H, W, 3) uint8 RGB array.

    Raises:
        CorruptImageError: the file exists but cannot be decoded (names the file and PIL's reason).
    """
    try:
        with Image.open(path) as image:
            return np.asarray(_to_rgb(image))
    except FileNotFoundError:
        raise
    except DECODE_ERRORS as err:
        raise CorruptImageError(f"cannot decode image {path}: {err}") from err


def check_decodable(path: str | os.PathLike[str]) -> str | None:
    """Return why ``path`` cannot be decoded, or None if it can.

    JPEGs are decoded at 1/8 scale (libjpeg's DCT scaling): every byte of the file is still read,
    so truncation is caught, at a fraction of the cost of a full decode.
    """
    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except DECODE_ERRORS as err:
        return f"{type(err).__name__}: {err}"
    return None


def find_corrupt(paths: Iterable[Path]) -> list[tuple[Path, str]]:
    """(path, reason) for every path in ``paths`` that cannot be decoded."""
    bad = []
    for path in paths:
        reason = check_decodable(path)
        if reason is not None:
            bad.append((path, reason))
    return bad
