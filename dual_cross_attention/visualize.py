"""Pictures: where the model looks (rollout, GLCA's patches), the confusion matrix, training curves.

Figures are drawn with matplotlib's object API on the Agg canvas (``Figure`` +
``FigureCanvasAgg``), never through ``pyplot``: importing this module changes no global
backend (a notebook or a training process keeps its own), and no figure is left registered
in pyplot's global list to leak memory over a long run.

Every figure has a fixed size in pixels (constants below), so callers and tests know what
they get.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

_logger = logging.getLogger(__name__)

DPI = 100
PANEL_INCHES = 2.4  # attention grid: each example is a row of three square panels
CONFUSION_INCHES = (8.0, 7.0)
CURVES_INCHES = (12.0, 8.0)
MAX_TICK_LABELS = 25  # the confusion matrix names its classes only when they are this few
CORRECT, WRONG = "#1a9850", "#d73027"
BRANCHES = ("sa", "glca", "pwca")
# One colour per branch / mode in every panel.
COLOURS = {
    "total": "black",
    "sa": "tab:blue",
    "glca": "tab:orange",
    "pwca": "tab:green",
    "sa+glca": "tab:purple",
}
EVAL_COLUMNS = {"sa": "eval_top1_sa", "glca": "eval_top1_glca", "sa+glca": "eval_top1_sa_glca"}
REID_COLUMNS = {"sa": "eval_mAP_sa", "glca": "eval_mAP_glca", "sa+glca": "eval_mAP_sa_glca"}  # Re-ID runs


def _new_figure(size_inches: tuple[float, float]) -> Figure:
    figure = Figure(figsize=size_inches, dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, out_png: str | Path) -> Path:
    # No bbox_inches="tight": it would make the pixel size depend on the text drawn.
    path = Path(out_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    _logger.info("wrote %s", path)
    return path


def check_patch_grid(image: np.ndarray, rollout: np.ndarray, selected: np.ndarray) -> None:
    """Refuse a rollout that is not a patch grid of ``image`` or selected patch indices outside it."""
    if rollout.ndim != 2:
        raise ValueError(f"rollout must be a (rows, columns) patch grid, got shape {rollout.shape}")
    (h, w), (gh, gw) = image.shape[:2], rollout.shape
    if h % gh or w % gw:
        raise ValueError(f"a {h}x{w} image does not split into a {gh}x{gw} patch grid")
    if selected.size and not 0 <= int(selected.min()) <= int(selected.max()) < gh * gw:
        raise ValueError(f"selected patch indices must be in [0, {gh * gw}), got {selected.tolist()}")


@dataclass
class AttentionExample:
    """One evaluated image and what the model did with it.

    Args:
        image: (H, W, 3) uint8, the picture as the model saw it (after the eval crop).
        rollout: (gh, gw) class-token attention rollout over the patch grid.
        selected: (k,) indices (row-major over the grid) of the patches GLCA used as queries.
        true_name: the class the image belongs to.
        predicted_name: the class the model predicted.
    """

    image: np.ndarray
    rollout: np.ndarray
    selected: np.ndarray
    true_name: str
    predicted_name: str

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8, got {self.image.shape} {self.image.dtype}")
        check_patch_grid(self.image, self.rollout, self.selected)

    @property
    def correct(self) -> bool:
        return self.true_name == self.predicted_name


def attention_grid_size(num_examples: int) -> tuple[int, int]:
    """Pixel (width, height) of ``draw_attention_grid`` for this many examples."""
    side = round(PANEL_INCHES * DPI)
    return 3 * side, num_examples * side


def _rollout_overlay(ax: Axes, example: AttentionExample) -> None:
    """The rollout, min-max scaled per image, over the image: one flat block per patch."""
    h, w = example.image.shape[:2]
    heat = example.rollout.astype(np.float64)
    span = heat.max() - heat.min()
    heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    ax.imshow(example.image)
    # Pixel centres sit on integers, so the image spans [-0.5, w - 0.5].
    extent = (-0.5, w - 0.5, h - 0.5, -0.5)
    ax.imshow(heat, cmap="inferno", alpha=0.6, extent=extent, interpolation="nearest", vmin=0, vmax=1)


def _outline_selected(ax: Axes, example: AttentionExample) -> None:
    h, w = example.image.shape[:2]
    gh, gw = example.rollout.shape
    ph, pw = h // gh, w // gw
    ax.imshow(example.image)
    for index in example.selected.tolist():
        row, col = divmod(index, gw)
        corner = (col * pw - 0.5, row * ph - 0.5)
        ax.add_patch(Rectangle(corner, pw, ph, fill=False, edgecolor="cyan", linewidth=1.5))


def _mark_outcome(axes: Sequence[Axes], correct: bool) -> None:
    colour = CORRECT if correct else WRONG
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(3)


def attention_figure(examples: Sequence[AttentionExample]) -> Figure:
    """One row per example: the image (true class), the rollout over it, and GLCA's patches
    outlined (predicted class). Frames are green when the prediction is right, red when wrong."""
    if not examples:
        raise ValueError("draw_attention_grid needs at least one example")
    width, height = attention_grid_size(len(examples))
    figure = _new_figure((width / DPI, height / DPI))
    axes = figure.subplots(len(examples), 3, squeeze=False)
    for row, example in zip(axes, examples, strict=True):
        row[0].imshow(example.image)
        row[0].set_title(f"true: {example.true_name}", fontsize=8)
        _rollout_overlay(row[1], example)
        row[1].set_title("attention rollout", fontsize=8)
        _outline_selected(row[2], example)
        verdict = "correct" if example.correct else "wrong"
        row[2].set_title(
            f"pred: {example.predicted_name} ({verdict})",
            fontsize=8,
            color=CORRECT if example.correct else WRONG,
        )
        _mark_outcome(row, example.correct)
    figure.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.12 / len(examples), hspace=0.25)
    return figure


def draw_attention_grid(examples: Sequence[AttentionExample], out_png: str | Path) -> Path:
    """Write ``attention_figure(examples)`` to ``out_png`` (size: ``attention_grid_size``)."""
    return _save(attention_figure(examples), out_png)


def confusion_figure(confusion: np.ndarray, classes: Sequence[str], title: str) -> Figure:
    """The confusion matrix as the share of each true class's images (rows sum to 100%).

    Args:
        confusion: (K, K) counts, rows = true class, columns = predicted class.
        classes: K class names (used as tick labels when there are at most ``MAX_TICK_LABELS``).
        title: the figure title (say which inference mode it shows).
    """
    k = len(classes)
    if confusion.shape != (k, k):
        raise ValueError(f"confusion must be ({k}, {k}) for {k} classes, got {confusion.shape}")
    counts = confusion.sum(axis=1, keepdims=True)
    # Classes without images get an empty row, not a division by zero.
    share = np.divide(100.0 * confusion, counts, out=np.zeros(confusion.shape), where=counts > 0)
    figure = _new_figure(CONFUSION_INCHES)
    ax = figure.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=100, interpolation="nearest")
    figure.colorbar(image, ax=ax, label="% of the true class's images")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if k <= MAX_TICK_LABELS:
        ax.set_xticks(range(k), classes, rotation=90, fontsize=6)
        ax.set_yticks(range(k), classes, fontsize=6)
    figure.subplots_adjust(left=0.25 if k <= MAX_TICK_LABELS else 0.1, bottom=0.25, right=0.95, top=0.93)
    return figure


def draw_confusion(confusion: np.ndarray, classes: Sequence[str], out_png: str | Path, title: str) -> Path:
    """Write ``confusion_figure`` to ``out_png`` (``CONFUSION_INCHES`` x ``DPI`` pixels)."""
    return _save(confusion_figure(confusion, classes, title), out_png)


def _plot(ax: Axes, frame: pd.DataFrame, column: str, label: str, colour: str, style: str = "-") -> None:
    """Plot a column if it has at least one value; a branch that is off (all NaN) is left out."""
    if column in frame and frame[column].notna().any():
        ax.plot(frame["epoch"], frame[column], style, color=colour, marker="o", markersize=3, label=label)


def _finish(ax: Axes, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=7)


def metrics_figure(frame: pd.DataFrame) -> Figure:
    """Four panels from a metrics.csv frame: loss per branch, accuracy per branch and eval mode,
    LR, and the uncertainty weights w_k."""
    if "epoch" not in frame or frame.empty:
        raise ValueError("metrics need an 'epoch' column and at least one row")
    figure = _new_figure(CURVES_INCHES)
    loss, accuracy, lr, weights = figure.subplots(2, 2).ravel()
    _plot(loss, frame, "train_loss", "total", COLOURS["total"])
    for b in BRANCHES:
        _plot(loss, frame, f"train_loss_{b}", b, COLOURS[b])
        _plot(accuracy, frame, f"train_acc_{b}", f"train {b}", COLOURS[b], style="--")
        _plot(weights, frame, f"weight_{b}", b, COLOURS[b])
    for mode, column in EVAL_COLUMNS.items():
        _plot(accuracy, frame, column, f"eval {mode}", COLOURS[mode])
    for mode, column in REID_COLUMNS.items():
        _plot(accuracy, frame, column, f"eval mAP {mode}", COLOURS[mode])
    _plot(lr, frame, "lr", "lr", COLOURS["total"])
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    _finish(loss, "training loss", "cross-entropy")
    reid = any(column in frame for column in REID_COLUMNS.values())
    _finish(accuracy, "train accuracy (dashed), eval " + ("mAP" if reid else "top-1"), "%")
    _finish(lr, "learning rate (end of epoch)", "LR")
    _finish(weights, "loss weights w_k", "w_k")
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.07, top=0.95, hspace=0.35, wspace=0.2)
    return figure


def plot_metrics(metrics_csv: str | Path, out_png: str | Path) -> Path:
    """Draw ``metrics.csv`` (one row per epoch, as the trainer writes it) into ``out_png``."""
    path = Path(metrics_csv)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}; it is written by train.py after each epoch")
    frame = pd.read_csv(path)
    try:
        figure = metrics_figure(frame)
    except ValueError as err:
        raise ValueError(f"cannot plot {path}: {err}") from err
    return _save(figure, out_png)
