"""The drawing code: what each figure shows (checked on the matplotlib objects against values
computed by hand) and that the PNGs are valid images of the documented size."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba
from matplotlib.patches import Rectangle
from PIL import Image

from dual_cross_attention.visualize import (
    CORRECT,
    WRONG,
    AttentionExample,
    attention_figure,
    confusion_figure,
    draw_attention_grid,
    draw_confusion,
    metrics_figure,
    plot_metrics,
)

BRANCHES = ("sa", "glca", "pwca")


def metrics_rows(epochs: int, pwca: bool) -> pd.DataFrame:
    """Rows with the columns run_io.metrics_row writes; the PWCA columns are NaN when it is off."""
    rows = []
    for e in range(epochs):
        row = {"epoch": e, "lr": 1e-3 * (e + 1), "train_loss": 3.0 - e}
        for i, b in enumerate(BRANCHES):
            on = b != "pwca" or pwca
            row[f"train_loss_{b}"] = 2.0 - 0.1 * e - i if on else math.nan
            row[f"train_acc_{b}"] = 10.0 + 5 * e + i if on else math.nan
            row[f"weight_{b}"] = 0.01 * e * (i + 1) if on else math.nan
        row.update(eval_top1_sa=20.0 + e, eval_top1_glca=30.0 + e, eval_top1_sa_glca=40.0 + e)
        row.update(skipped_steps=0, epoch_time_s=1.5, peak_mem_mb=100.0)
        rows.append(row)
    return pd.DataFrame(rows)


def line_labels(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines()]


def test_plot_metrics_leaves_out_a_branch_that_is_off(tmp_path):
    csv = tmp_path / "metrics.csv"
    metrics_rows(3, pwca=False).to_csv(csv, index=False)  # NaN is written as an empty field
    loss, accuracy, lr, weights = metrics_figure(pd.read_csv(csv)).axes
    assert line_labels(loss) == ["total", "sa", "glca"]
    assert line_labels(accuracy) == ["train sa", "train glca", "eval sa", "eval glca", "eval sa+glca"]
    assert line_labels(lr) == ["lr"]
    assert line_labels(weights) == ["sa", "glca"]
    eval_sa_glca = accuracy.get_lines()[-1]
    assert list(eval_sa_glca.get_xdata()) == [0, 1, 2] and list(eval_sa_glca.get_ydata()) == [40, 41, 42]
    out = plot_metrics(csv, tmp_path / "curves.png")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1200, 800)


def test_plot_metrics_with_every_branch_and_a_single_epoch(tmp_path):
    csv = tmp_path / "metrics.csv"
    metrics_rows(1, pwca=True).to_csv(csv, index=False)
    loss, _, _, weights = metrics_figure(pd.read_csv(csv)).axes
    assert line_labels(loss) == ["total", "sa", "glca", "pwca"]
    assert line_labels(weights) == ["sa", "glca", "pwca"]
    with Image.open(plot_metrics(csv, tmp_path / "curves.png")) as image:
        image.verify()


def test_plot_metrics_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics file at .*missing.csv"):
        plot_metrics(tmp_path / "missing.csv", tmp_path / "curves.png")
    empty = tmp_path / "empty.csv"
    metrics_rows(1, pwca=True).iloc[:0].to_csv(empty, index=False)
    with pytest.raises(ValueError, match=r"cannot plot .*empty.csv"):
        plot_metrics(empty, tmp_path / "curves.png")


def example(correct: bool) -> AttentionExample:
    rng = np.random.default_rng(0)
    return AttentionExample(
        image=rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
        rollout=np.arange(16, dtype=np.float32).reshape(4, 4) + 10,
        selected=np.array([6, 9]),  # grid (row 1, col 2) and (row 2, col 1)
        true_name="002.mark_b",
        predicted_name="002.mark_b" if correct else "003.mark_c",
    )


def test_attention_figure_shows_rollout_outlines_and_outcome():
    figure = attention_figure([example(correct=True), example(correct=False)])
    axes = np.array(figure.axes).reshape(2, 3)
    overlay = axes[0, 1].get_images()[1].get_array()
    np.testing.assert_allclose(overlay, np.arange(16).reshape(4, 4) / 15)  # min-max scaled
    boxes = [p for p in axes[0, 2].patches if isinstance(p, Rectangle)]
    corners = sorted((b.get_x(), b.get_y(), b.get_width(), b.get_height()) for b in boxes)
    assert corners == [(7.5, 15.5, 8, 8), (15.5, 7.5, 8, 8)]  # 8 px patches, pixel edges at -0.5
    assert axes[0, 0].get_title() == "true: 002.mark_b"
    assert axes[0, 2].get_title() == "pred: 002.mark_b (correct)"
    assert axes[1, 2].get_title() == "pred: 003.mark_c (wrong)"
    assert axes[0, 0].spines["left"].get_edgecolor() == to_rgba(CORRECT)
    assert axes[1, 1].spines["left"].get_edgecolor() == to_rgba(WRONG)


def test_attention_grid_png_has_three_panels_per_example(tmp_path):
    out = draw_attention_grid([example(True), example(False)], tmp_path / "attention_grid.png")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (720, 480)
        assert np.asarray(image.convert("L")).std() > 10


def test_attention_example_rejects_inconsistent_inputs():
    good = example(True)
    with pytest.raises(ValueError, match=r"in \[0, 16\)"):
        AttentionExample(good.image, good.rollout, np.array([16]), "a", "a")
    with pytest.raises(ValueError, match="does not split into a 5x5"):
        AttentionExample(good.image, np.zeros((5, 5)), np.array([0]), "a", "a")
    with pytest.raises(ValueError, match="uint8"):
        AttentionExample(good.image.astype(np.float32), good.rollout, good.selected, "a", "a")


def test_confusion_figure_shows_each_true_class_as_shares():
    confusion = np.array([[3, 1, 0], [0, 0, 0], [2, 2, 4]])
    figure = confusion_figure(confusion, ["a", "b", "c"], "confusion (sa+glca)")
    ax = figure.axes[0]
    expected = [[75, 25, 0], [0, 0, 0], [25, 25, 50]]  # a class without images: an empty row
    np.testing.assert_allclose(ax.get_images()[0].get_array(), expected)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    assert ax.get_title() == "confusion (sa+glca)"
    many = confusion_figure(np.eye(30, dtype=int), [f"class {i}" for i in range(30)], "t").axes[0]
    assert "class 0" not in [t.get_text() for t in many.get_yticklabels()]  # too many to name
    with pytest.raises(ValueError, match=r"must be \(2, 2\) for 2 classes"):
        confusion_figure(confusion, ["a", "b"], "t")


def test_confusion_png_size(tmp_path):
    out = draw_confusion(np.eye(3, dtype=int), ["a", "b", "c"], tmp_path / "sub" / "confusion.png", "t")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (800, 700)
