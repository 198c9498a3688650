"""Verification pictures: ROC curves on a log-FAR axis, and the score histograms of both pair kinds.

Drawn like ``visualize``: matplotlib's object API on the Agg canvas (no ``pyplot``, no global
backend change), a fixed size in pixels per figure (constants below).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from numpy.typing import ArrayLike
from sklearn.metrics import auc as area_under

from ..errors import UsageError
from ..visualize import (
    COLOURS,
    DPI,
    PANEL_INCHES,
    AttentionExample,
    _new_figure,
    _outline_selected,
    _rollout_overlay,
    _save,
)
from .metrics import check_pairs

ROC_INCHES = (6.0, 5.0)  # 600 x 500 px at DPI
HISTOGRAM_INCHES = (7.0, 4.5)  # 700 x 450 px at DPI
FPR_FLOOR = 1e-4  # a FAR of 0 cannot sit on a log axis: such points are drawn at this floor
HISTOGRAM_BINS = 50
PAIR_INCHES = (2 * PANEL_INCHES, 2 * PANEL_INCHES + 0.6)  # 480 x 540 px: 2 x 2 panels and a title
SAME_COLOUR, DIFFERENT_COLOUR = "tab:green", "tab:red"


def figure_pixels(size_inches: tuple[float, float]) -> tuple[int, int]:
    """(width, height) in pixels of a figure of ``size_inches`` (e.g. ``ROC_INCHES``)."""
    return round(size_inches[0] * DPI), round(size_inches[1] * DPI)


def make_roc_figure(
    curves: Mapping[str, tuple[ArrayLike, ArrayLike]], fpr_floor: float = FPR_FLOOR
) -> Figure:
    """One ROC curve per mode: TAR against FAR, FAR on a log axis from ``fpr_floor`` to 1.

    Args:
        curves: mode (e.g. ``"sa"``, ``"sa+glca"``) -> (fpr, tpr), each (P,) ascending, as
            ``VerificationResult.fpr`` / ``.tpr`` hold them. The legend gives each curve's AUC
            (trapezoids over the given points, so the full ROC gives ``roc_auc_score``'s value).
        fpr_floor: FAR values below it (zeros) are drawn at it.
    """
    if not curves:
        raise UsageError("roc_figure needs at least one (fpr, tpr) curve")
    if not 0.0 < fpr_floor < 1.0:
        raise UsageError(f"fpr_floor must be in (0, 1), got {fpr_floor}")
    figure = _new_figure(ROC_INCHES)
    ax = figure.add_subplot()
    for mode, (fpr, tpr) in curves.items():
        fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
        if fpr.ndim != 1 or fpr.shape != tpr.shape or len(fpr) < 2:
            raise UsageError(f"curve {mode!r}: fpr and tpr must be 1-D, of one length >= 2")
        label = f"{mode} (AUC {area_under(fpr, tpr):.4f})"
        ax.plot(np.clip(fpr, fpr_floor, 1.0), tpr, color=COLOURS.get(mode), label=label)
    chance = np.geomspace(fpr_floor, 1.0, 100)
    ax.plot(chance, chance, ":", color="grey", label="chance")
    ax.set_xscale("log")
    ax.set_xlim(fpr_floor, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("false accept rate (FAR, log scale)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.set_title("verification ROC")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    figure.subplots_adjust(left=0.12, right=0.96, bottom=0.11, top=0.93)
    return figure


def roc_figure(
    curves: Mapping[str, tuple[ArrayLike, ArrayLike]], path: str | Path, fpr_floor: float = FPR_FLOOR
) -> Path:
    """Write ``make_roc_figure(curves, fpr_floor)`` to ``path`` (``ROC_INCHES`` x ``DPI`` pixels)."""
    return _save(make_roc_figure(curves, fpr_floor), path)


def make_score_histogram(
    scores: ArrayLike, same: ArrayLike, threshold: float | None, title: str = "pair scores"
) -> Figure:
    """Histograms of same-identity and different-identity scores on shared bins, each normalised to
    unit area (the two kinds are usually far from equal in number; the legend gives the counts),
    with a vertical line at ``threshold`` (none when it is None)."""
    s, y = check_pairs(scores, same)
    edges = np.histogram_bin_edges(s, bins=HISTOGRAM_BINS)
    figure = _new_figure(HISTOGRAM_INCHES)
    ax = figure.add_subplot()
    for kind, mask, colour in (("same", y, SAME_COLOUR), ("different", ~y, DIFFERENT_COLOUR)):
        label = f"{kind} identity (n={int(mask.sum())})"
        ax.hist(s[mask], bins=edges, density=True, alpha=0.5, color=colour, label=label)
    if threshold is not None:
        ax.axvline(float(threshold), color="black", linestyle="--", label=f"threshold {float(threshold):.4f}")
    ax.set_xlabel("score (higher = more alike)")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.92)
    return figure


def score_histogram(
    scores: ArrayLike, same: ArrayLike, threshold: float | None, path: str | Path, title: str = "pair scores"
) -> Path:
    """Write ``make_score_histogram`` to ``path`` (``HISTOGRAM_INCHES`` x ``DPI`` pixels)."""
    return _save(make_score_histogram(scores, same, threshold, title), path)


def make_pair_figure(first: AttentionExample, second: AttentionExample, title: str) -> Figure:
    """Two images side by side (columns), each with its attention rollout over it (top row) and the
    patches GLCA picked as queries outlined (bottom row), under ``title`` (the scores and decision)."""
    figure = _new_figure(PAIR_INCHES)
    axes = figure.subplots(2, 2, squeeze=False)
    for column, (letter, example) in enumerate(zip("AB", (first, second), strict=True)):
        _rollout_overlay(axes[0, column], example)
        axes[0, column].set_title(f"{letter}: {example.true_name}\nattention rollout", fontsize=7)
        _outline_selected(axes[1, column], example)
        axes[1, column].set_title(f"{letter}: the {example.selected.size} GLCA patches", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    figure.suptitle(title, fontsize=9)
    figure.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.84, hspace=0.18, wspace=0.05)
    return figure


def pair_figure(first: AttentionExample, second: AttentionExample, title: str, path: str | Path) -> Path:
    """Write ``make_pair_figure`` to ``path`` (``PAIR_INCHES`` x ``DPI`` pixels)."""
    return _save(make_pair_figure(first, second, title), path)
