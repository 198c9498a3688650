"""Verification metrics against hand-worked values and brute-force threshold sweeps that share no code
with the module (plain numpy over every distinct score), and the verification pictures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dual_cross_attention.errors import UsageError
from dual_cross_attention.verification import (
    accuracy_at,
    choose_threshold,
    far_key,
    make_roc_figure,
    make_score_histogram,
    roc_figure,
    score_histogram,
    verification_metrics,
)


def labelled(positives, negatives) -> tuple[np.ndarray, np.ndarray]:
    scores = np.concatenate([np.asarray(positives, float), np.asarray(negatives, float)])
    same = np.concatenate([np.ones(len(positives), bool), np.zeros(len(negatives), bool)])
    return scores, same


def random_set(seed: int, positives: int, negatives: int, decimals: int = 2):
    """Overlapping scores rounded so that many are tied, within and across the two kinds."""
    rng = np.random.default_rng(seed)
    pos = np.round(rng.normal(0.5, 0.2, positives), decimals)
    neg = np.round(rng.normal(0.2, 0.2, negatives), decimals)
    return labelled(pos, neg)


def sweep(scores, same):
    """Brute force: (threshold, FAR, FRR, TAR, accuracy) at every distinct score and above them all."""
    thresholds = np.append(np.unique(scores), np.inf)
    far = np.array([np.mean(scores[~same] >= t) for t in thresholds])
    tar = np.array([np.mean(scores[same] >= t) for t in thresholds])
    accuracy = np.array([np.mean((scores >= t) == same) for t in thresholds])
    return thresholds, far, 1 - tar, tar, accuracy


# --- hand-worked sets ---------------------------------------------------------------------------


def test_perfect_separation():
    scores, same = labelled(np.linspace(0.6, 1.0, 50), np.linspace(-1.0, 0.4, 1000))
    result = verification_metrics(scores, same)
    assert result.auc == 1.0
    assert result.eer == 0.0
    assert result.eer_threshold == pytest.approx(0.6)  # lowest positive: FAR = FRR = 0 there
    assert result.as_dict()["tar_at_far"] == {"1e-01": 1.0, "1e-02": 1.0, "1e-03": 1.0}
    assert choose_threshold(scores, same) == pytest.approx(0.5)  # midway between 0.4 and 0.6
    assert accuracy_at(scores, same, 0.5) == 1.0


def test_complete_overlap():
    grid = np.linspace(0.0, 1.0, 10)
    result = verification_metrics(*labelled(grid, grid), far_targets=(0.1,))
    assert result.auc == 0.5
    assert result.eer == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    noisy = verification_metrics(*labelled(rng.normal(size=4000), rng.normal(size=4000)))
    assert noisy.auc == pytest.approx(0.5, abs=0.02)
    assert noisy.eer == pytest.approx(0.5, abs=0.02)


def test_hand_worked_set():
    # Above each threshold t (score >= t): 0.6 accepts positives {0.9, 0.8, 0.6} and negative {0.7}:
    # FAR = FRR = 1/4. Positive beats negative in 4 + 4 + 3 + 2 = 13 of 16 pairs.
    scores, same = labelled([0.9, 0.8, 0.6, 0.3], [0.7, 0.4, 0.2, 0.1])
    result = verification_metrics(scores, same, far_targets=(0.25, 0.5))
    assert result.auc == pytest.approx(13 / 16)
    assert result.eer == pytest.approx(0.25)
    assert result.eer_threshold == pytest.approx(0.6)
    at_quarter, at_half = result.tar_at_far["2.5e-01"], result.tar_at_far["5e-01"]
    assert (at_quarter.tar, at_quarter.threshold, at_quarter.achieved_far) == (0.75, 0.6, 0.25)
    assert (at_half.tar, at_half.threshold) == (1.0, 0.3)
    # Accuracy 6/8 at thresholds in (0.7, 0.8], (0.4, 0.6] and (0.2, 0.3]: the highest one wins.
    assert choose_threshold(scores, same) == pytest.approx(0.75)


def test_eer_is_interpolated_between_the_bracketing_points():
    # ROC points: at 0.8 FAR 0, FRR 1/3 (FAR - FRR = -1/3); at 0.7 FAR 1/2, FRR 1/3 (+1/6).
    # FAR - FRR is zero 2/3 of the way: FAR = FRR = 1/3, threshold 0.8 - (2/3) 0.1.
    result = verification_metrics(*labelled([0.9, 0.8, 0.5], [0.7, 0.3]), far_targets=(0.5,))
    assert result.auc == pytest.approx(5 / 6)
    assert result.eer == pytest.approx(1 / 3)
    assert result.eer_threshold == pytest.approx(0.8 - 0.2 / 3)


# --- against brute force ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_eer_matches_the_brute_force_far_frr_crossing(seed):
    scores, same = random_set(seed, positives=40 + 10 * seed, negatives=70)
    result = verification_metrics(scores, same)
    thresholds, far, frr, _, _ = sweep(scores, same)
    best = int(np.argmin(np.abs(far - frr)))
    # The interpolated EER lies between FAR and FRR at the best discrete threshold ...
    assert min(far[best], frr[best]) - 1e-12 <= result.eer <= max(far[best], frr[best]) + 1e-12
    # ... so within one step of the set's resolution of their mean.
    resolution = 1 / min(same.sum(), (~same).sum())
    assert abs(result.eer - (far[best] + frr[best]) / 2) <= resolution
    # The EER threshold lies between the last threshold with FAR >= FRR and the first with FAR <= FRR.
    gap = far - frr  # falls as the threshold rises
    assert thresholds[gap >= 0].max() - 1e-12 <= result.eer_threshold <= thresholds[gap <= 0].min() + 1e-12


@pytest.mark.parametrize("seed", range(4))
def test_tar_at_far_matches_a_brute_force_sweep(seed):
    scores, same = random_set(seed, positives=300, negatives=2000, decimals=3)
    result = verification_metrics(scores, same)
    _, far, _, tar, _ = sweep(scores, same)
    for target in (1e-1, 1e-2, 1e-3):
        point = result.tar_at_far[far_key(target)]
        assert point.tar == tar[far <= target].max()
        # The reported threshold is one that really gives this TAR within the target.
        assert np.mean(scores[~same] >= point.threshold) <= target
        assert np.mean(scores[same] >= point.threshold) == point.tar


def test_tar_needs_enough_negatives():
    targets = (1e-1, 1e-2, 1e-3)
    few = verification_metrics(*random_set(0, 30, 99), far_targets=targets).as_dict()
    assert few["tar_at_far"]["1e-01"] is not None
    assert few["tar_at_far"]["1e-02"] is None and few["tar_at_far"]["1e-03"] is None
    assert few["tar_at_far_reason"] == {
        "1e-02": "n/a: needs at least 100 negatives",
        "1e-03": "n/a: needs at least 1000 negatives",
    }
    enough = verification_metrics(*random_set(0, 30, 100), far_targets=targets).as_dict()
    assert enough["tar_at_far"]["1e-02"] is not None and list(enough["tar_at_far_reason"]) == ["1e-03"]


def test_as_dict_is_json_ready_with_stable_keys():
    scores, same = random_set(1, 20, 30)
    summary = verification_metrics(scores, same, threshold=0.3).as_dict()
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary
    assert set(summary) == {
        "auc", "eer", "eer_threshold", "tar_at_far", "tar_at_far_reason",
        "threshold", "accuracy", "num_positives", "num_negatives",
    }  # fmt: skip
    assert list(summary["tar_at_far"]) == ["1e-01", "1e-02", "1e-03"]
    assert (summary["num_positives"], summary["num_negatives"]) == (20, 30)
    assert all(0.0 <= summary[k] <= 1.0 for k in ("auc", "eer", "accuracy"))
    assert verification_metrics(scores, same).as_dict()["accuracy"] is None
    assert [far_key(t) for t in (0.1, 0.025, 1e-3)] == ["1e-01", "2.5e-02", "1e-03"]


@pytest.mark.parametrize(
    ("scores", "same", "message"),
    [
        ([0.1, 0.2], [1, 1], "both same-identity and different-identity"),
        ([0.1, 0.2], [0, 0], "both same-identity and different-identity"),
        ([0.1, 0.2, 0.3], [1, 0], "one entry per pair"),
        ([0.1, np.nan], [1, 0], "finite"),
        ([0.1, 0.2], [1, 2], "0/1"),
        ([], [], "empty"),
    ],
)
def test_bad_inputs_are_rejected(scores, same, message):
    with pytest.raises(UsageError, match=message):
        verification_metrics(scores, same)


def test_far_targets_are_checked():
    scores, same = random_set(0, 5, 5)
    for bad in ((0.0,), (1.5,), (0.1, 0.1)):
        with pytest.raises(UsageError, match="FAR target"):
            verification_metrics(scores, same, far_targets=bad)


# --- thresholds ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_choose_threshold_reaches_the_brute_force_accuracy_maximum(seed):
    scores, same = random_set(seed, positives=25 + 5 * seed, negatives=60, decimals=1)  # many ties
    chosen = choose_threshold(scores, same)
    _, _, _, _, accuracy = sweep(scores, same)
    assert accuracy_at(scores, same, chosen) == accuracy.max()
    # The threshold sits strictly between two neighbouring distinct scores (or beyond them all).
    assert chosen not in set(scores.tolist())
    assert choose_threshold(scores[::-1], same[::-1]) == chosen  # order of the pairs does not matter


def test_choose_threshold_beyond_every_score():
    # Mostly negatives, scored above the positives: rejecting everything is best.
    scores, same = labelled([0.1], [0.5, 0.6, 0.7])
    chosen = choose_threshold(scores, same)
    assert chosen > 0.7 and accuracy_at(scores, same, chosen) == 0.75
    scores, same = labelled([0.5, 0.6, 0.7], [0.9])
    chosen = choose_threshold(scores, same)
    assert chosen < 0.5 and accuracy_at(scores, same, chosen) == 0.75


def test_choose_threshold_between_adjacent_floats():
    # No float lies strictly between these two scores; the threshold must still separate them.
    low = 0.5
    scores, same = labelled([np.nextafter(low, 1.0)], [low])
    assert accuracy_at(scores, same, choose_threshold(scores, same)) == 1.0


def test_validation_threshold_is_applied_unchanged_to_test_pairs():
    val_scores, val_same = labelled([0.9, 0.8, 0.7], [0.5, 0.4, 0.3])  # best: 0.6
    test_scores, test_same = labelled([0.9, 0.55, 0.5], [0.2, 0.1, 0.6])  # best on test would differ
    chosen = choose_threshold(val_scores, val_same)
    assert chosen == pytest.approx(0.6)
    result = verification_metrics(test_scores, test_same, threshold=chosen)
    assert result.threshold == chosen
    assert result.accuracy == np.mean((test_scores >= chosen) == test_same) == pytest.approx(3 / 6)
    assert result.accuracy == accuracy_at(test_scores, test_same, chosen)
    assert accuracy_at(test_scores, test_same, choose_threshold(test_scores, test_same)) > result.accuracy


# --- pictures -----------------------------------------------------------------------------------


def test_roc_figure_writes_a_png_with_auc_in_the_legend(tmp_path):
    results = {
        mode: verification_metrics(*random_set(seed, 50, 500)) for seed, mode in enumerate(("sa", "sa+glca"))
    }
    curves = {mode: (r.fpr, r.tpr) for mode, r in results.items()}
    ax = make_roc_figure(curves).axes[0]
    assert ax.get_xscale() == "log"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [f"{m} (AUC {r.auc:.4f})" for m, r in results.items()] + ["chance"]
    assert min(ax.get_lines()[0].get_xdata()) > 0  # FAR 0 clipped to the floor for the log axis
    path = roc_figure(curves, tmp_path / "out" / "roc.png")
    assert path.is_file()
    with Image.open(path) as image:
        assert (image.format, image.size) == ("PNG", (600, 500))


def test_score_histogram_writes_a_png_with_the_threshold(tmp_path):
    scores, same = random_set(2, 80, 200)
    ax = make_score_histogram(scores, same, 0.35).axes[0]
    (line,) = [line for line in ax.get_lines() if line.get_label().startswith("threshold")]
    assert list(line.get_xdata()) == [0.35, 0.35]
    heights = [sum(p.get_height() * p.get_width() for p in c) for c in ax.containers]
    assert heights == pytest.approx([1.0, 1.0])  # both kinds drawn, each normalised to unit area
    path = score_histogram(scores, same, 0.35, tmp_path / "hist.png")
    with Image.open(path) as image:
        assert (image.format, image.size) == ("PNG", (700, 450))
