"""The Re-ID retrieval picture: queries, where the model looked, and their top gallery matches.

One row per query: the query image, the same image under its attention rollout with the patches
GLCA picked outlined, then its ``TOP_K`` nearest gallery images after the evaluation protocol's
exclusions, nearest first, each framed green when it is the query's identity and red when not,
titled with its rank, identity, camera and distance.

Drawn like ``visualize``'s figures (object API on the Agg canvas, ``DPI``); the layout is fixed in
pixels, so ``reid_matches_size(n)`` is the PNG's size and every panel has a known place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .visualize import CORRECT, DPI, WRONG, _new_figure, _rollout_overlay, _save, check_patch_grid

TOP_K = 10  # gallery matches drawn per query
QUERY_PANELS = 2  # the query image, and the query under its rollout and GLCA patches
# Layout in pixels at DPI. A panel is a 1:2 (width:height) box, the shape of a person crop; an
# image of another shape is fitted inside it, its frame around the image.
PANEL_PX = (100, 200)
TITLE_PX = 34  # two lines of panel title above each panel
ROW_GAP_PX = 10  # below each row
COLUMN_GAP_PX = 10
QUERY_GAP_PX = 30  # extra space between the query's panels and its matches
MARGIN_PX = 10  # left and right
HEADER_PX = 28  # the caption line at the top
FRAME_WIDTH = 3.0  # points; the green/red frame of a match
SELECTED_COLOUR = "cyan"


def _check_image(image: np.ndarray, what: str) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{what} must be (H, W, 3) uint8, got {image.shape} {image.dtype}")


@dataclass
class GalleryMatch:
    """One ranked gallery image.

    Args:
        image: (H, W, 3) uint8, as the model saw it.
        pid: its identity.
        camid: its 0-based camera, -1 when unknown.
        distance: its distance to the query (the one it was ranked by).
        correct: whether it is the query's identity.
    """

    image: np.ndarray
    pid: int
    camid: int
    distance: float
    correct: bool

    def __post_init__(self) -> None:
        _check_image(self.image, "a gallery image")


@dataclass
class ReIDExample:
    """A query, what the model attended to, and its nearest gallery images.

    Args:
        image: (H, W, 3) uint8, the query as the model saw it.
        pid: the query's identity.
        camid: its 0-based camera, -1 when unknown.
        rollout: (gh, gw) class-token attention rollout over the patch grid; None for a model
            without GLCA (the attention panel then shows the image alone).
        selected: (k,) indices (row-major over the grid) of the patches GLCA used as queries.
        matches: at most ``TOP_K`` ranked gallery images, nearest first; fewer leave blank slots.
    """

    image: np.ndarray
    pid: int
    camid: int
    rollout: np.ndarray | None = None
    selected: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    matches: Sequence[GalleryMatch] = ()

    def __post_init__(self) -> None:
        _check_image(self.image, "the query image")
        if len(self.matches) > TOP_K:
            raise ValueError(f"at most {TOP_K} matches are drawn per query, got {len(self.matches)}")
        if self.rollout is None:
            if self.selected.size:
                raise ValueError("selected patches need the rollout's patch grid")
            return
        check_patch_grid(self.image, self.rollout, self.selected)


def _row_px() -> int:
    return TITLE_PX + PANEL_PX[1] + ROW_GAP_PX


def reid_matches_size(num_queries: int) -> tuple[int, int]:
    """Pixel (width, height) of ``draw_reid_matches`` for this many queries:
    width = 2 MARGIN + (QUERY_PANELS + TOP_K) PANEL_W + (QUERY_PANELS + TOP_K - 1) COLUMN_GAP + QUERY_GAP,
    height = HEADER + n (TITLE + PANEL_H + ROW_GAP); 1360 x (28 + 244 n) with the defaults."""
    columns = QUERY_PANELS + TOP_K
    width = 2 * MARGIN_PX + columns * PANEL_PX[0] + (columns - 1) * COLUMN_GAP_PX + QUERY_GAP_PX
    return width, HEADER_PX + num_queries * _row_px()


def _panel_rect(row: int, column: int, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Figure-fraction (left, bottom, width, height) of a panel's box; rows from the top."""
    width, height = size
    left = MARGIN_PX + column * (PANEL_PX[0] + COLUMN_GAP_PX)
    if column >= QUERY_PANELS:
        left += QUERY_GAP_PX
    top = HEADER_PX + row * _row_px() + TITLE_PX
    bottom = height - top - PANEL_PX[1]
    return left / width, bottom / height, PANEL_PX[0] / width, PANEL_PX[1] / height


def _who(pid: int, camid: int) -> str:
    # Cameras are shown 1-based, as the datasets' file names number them.
    return f"id {pid}" if camid < 0 else f"id {pid} c{camid + 1}"


def _frame(ax: Axes, colour: str, width: float) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(width)


def _draw_attention(ax: Axes, example: ReIDExample) -> None:
    if example.rollout is None:
        ax.imshow(example.image)
        ax.set_title("no GLCA: no rollout", fontsize=7)
        return
    _rollout_overlay(ax, example)
    h, w = example.image.shape[:2]
    gh, gw = example.rollout.shape
    ph, pw = h // gh, w // gw
    for index in example.selected.tolist():
        row, col = divmod(index, gw)
        # Pixel centres sit on integers, so patch (row, col) starts at (col pw - 0.5, row ph - 0.5).
        corner = (col * pw - 0.5, row * ph - 0.5)
        ax.add_patch(Rectangle(corner, pw, ph, fill=False, edgecolor=SELECTED_COLOUR, linewidth=1.0))
    ax.set_title(f"rollout, {example.selected.size}\nGLCA patches", fontsize=7)


def reid_matches_figure(examples: Sequence[ReIDExample], caption: str = "") -> Figure:
    """The picture described in the module docstring (size ``reid_matches_size(len(examples))``).

    ``figure.axes`` holds, per query in order, ``QUERY_PANELS + TOP_K`` panels: the query, its
    attention, then the gallery slots nearest first (a slot without a match has its axis off).
    """
    if not examples:
        raise ValueError("draw_reid_matches needs at least one query")
    size = reid_matches_size(len(examples))
    figure = _new_figure((size[0] / DPI, size[1] / DPI))
    if caption:
        figure.text(0.5, 1 - (HEADER_PX / 2) / size[1], caption, ha="center", va="center", fontsize=8)
    for row, example in enumerate(examples):
        query = figure.add_axes(_panel_rect(row, 0, size))
        query.imshow(example.image)
        query.set_title(f"query\n{_who(example.pid, example.camid)}", fontsize=7)
        _frame(query, "black", 1.0)
        attention = figure.add_axes(_panel_rect(row, 1, size))
        _draw_attention(attention, example)
        _frame(attention, "black", 1.0)
        for rank in range(1, TOP_K + 1):
            ax = figure.add_axes(_panel_rect(row, QUERY_PANELS + rank - 1, size))
            if rank > len(example.matches):
                ax.set_axis_off()
                continue
            match = example.matches[rank - 1]
            colour = CORRECT if match.correct else WRONG
            ax.imshow(match.image)
            ax.set_title(f"#{rank} {_who(match.pid, match.camid)}\nd {match.distance:.3f}", fontsize=7,
                         color=colour)  # fmt: skip
            _frame(ax, colour, FRAME_WIDTH)
    return figure


def draw_reid_matches(examples: Sequence[ReIDExample], out_png: str | Path, caption: str = "") -> Path:
    """Write ``reid_matches_figure(examples, caption)`` to ``out_png`` (size ``reid_matches_size``)."""
    return _save(reid_matches_figure(examples, caption), out_png)
