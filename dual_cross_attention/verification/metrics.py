"""Pair-verification metrics: given a similarity score per image pair, how well do scores separate
same-identity pairs from different-identity ones?

Conventions used throughout:

- ``scores`` are floats, higher = more alike (e.g. the cosine similarity of two embeddings).
- ``same`` is 1/True for a same-identity (genuine, positive) pair, 0/False for a
  different-identity (impostor, negative) one.
- The decision at a threshold ``t`` is ``score >= t`` means "same". This is also how
  scikit-learn's ``roc_curve`` places its points, so a threshold read off the ROC means the same
  thing everywhere here.
- Every rate is a fraction in [0, 1], never a percentage: FAR (false accept rate, the FPR: the
  share of negatives accepted), FRR (false reject rate, 1 - TPR), TAR (true accept rate, the TPR),
  AUC, EER and accuracy.

The ROC comes from ``sklearn.metrics.roc_curve`` with ``drop_intermediate=False``, so it has one
point per distinct score (plus the "accept nothing" point at threshold +inf); the AUC from
``sklearn.metrics.roc_auc_score`` (ties between a positive and a negative count one half).

Thresholds are chosen on validation pairs (``choose_threshold``) and then applied unchanged to
test pairs (``verification_metrics(test_scores, test_same, threshold=t)``); choosing one on the
test pairs themselves would report an optimistic accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import roc_auc_score, roc_curve

from ..errors import UsageError

DEFAULT_FAR_TARGETS = (1e-1, 1e-2, 1e-3)


@dataclass(frozen=True)
class TarAtFar:
    """The true accept rate at one false accept rate target.

    ``tar`` is the highest TPR over the ROC points whose FPR is <= ``far`` (no interpolation: a
    threshold that exists, the smallest ROC threshold meeting the target). It is ``None`` when the
    set has fewer than ``ceil(1 / far)`` negatives: then no threshold can have a FAR that is both
    non-zero and <= the target, so the number would say nothing about that FAR; ``reason`` then
    reads ``"n/a: needs at least N negatives"``.

    Args:
        far: the FAR target, a fraction in (0, 1).
        tar: TAR (fraction in [0, 1]) at the chosen threshold, or None when not available.
        threshold: the score threshold giving ``tar`` (a score above all scores when only "accept
            nothing" meets the target); None when not available.
        achieved_far: the FAR actually reached at ``threshold`` (<= ``far``); None when not available.
        reason: why ``tar`` is None; None when it is available.
    """

    far: float
    tar: float | None
    threshold: float | None
    achieved_far: float | None
    reason: str | None = None

    @property
    def available(self) -> bool:
        return self.tar is not None


@dataclass(frozen=True)
class VerificationResult:
    """What ``verification_metrics`` measured on one set of scored pairs.

    Args:
        auc: area under the ROC curve, a fraction in [0, 1] (0.5 = chance).
        eer: equal error rate, a fraction in [0, 1]: where FAR = FRR on the ROC, linearly
            interpolated between the two ROC points that bracket the crossing.
        eer_threshold: the score threshold at the EER, interpolated linearly between the thresholds
            of the same two points.
        tar_at_far: FAR key (see ``far_key``) -> ``TarAtFar``, in the order the targets were given.
        num_positives: number of same-identity pairs.
        num_negatives: number of different-identity pairs.
        threshold: the decision threshold that ``accuracy`` was measured at (None when none given).
        accuracy: share of pairs decided correctly at ``threshold``, a fraction in [0, 1].
        fpr: (P,) ROC false positive rates (FAR), ascending, one per distinct score plus the first
            point (0, 0); for drawing, not part of ``as_dict``.
        tpr: (P,) ROC true positive rates (TAR) matching ``fpr``.
    """

    auc: float
    eer: float
    eer_threshold: float
    tar_at_far: dict[str, TarAtFar]
    num_positives: int
    num_negatives: int
    threshold: float | None = None
    accuracy: float | None = None
    fpr: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False, compare=False)
    tpr: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False, compare=False)

    def as_dict(self) -> dict:
        """JSON-ready summary; every rate a fraction in [0, 1].

        Keys: ``auc``, ``eer``, ``eer_threshold``, ``tar_at_far`` (FAR key -> TAR or None),
        ``tar_at_far_reason`` (FAR key -> "n/a: ..." for every TAR that is None; empty when all
        are available), ``threshold``, ``accuracy`` (None when no threshold was given),
        ``num_positives``, ``num_negatives``. FAR keys are ``far_key(target)``, e.g. ``"1e-01"``.
        """
        return {
            "auc": self.auc,
            "eer": self.eer,
            "eer_threshold": self.eer_threshold,
            "tar_at_far": {key: point.tar for key, point in self.tar_at_far.items()},
            "tar_at_far_reason": {
                key: point.reason for key, point in self.tar_at_far.items() if point.reason is not None
            },
            "threshold": self.threshold,
            "accuracy": self.accuracy,
            "num_positives": self.num_positives,
            "num_negatives": self.num_negatives,
        }


def far_key(target: float) -> str:
    """The stable dictionary key of a FAR target: scientific notation with the fewest mantissa digits
    that still parse back to exactly ``target`` and a two-digit exponent: 0.1 -> ``"1e-01"``,
    0.001 -> ``"1e-03"``, 0.025 -> ``"2.5e-02"``."""
    for digits in range(17):
        text = f"{target:.{digits}e}"
        if float(text) == target:
            return text
    return repr(target)  # unreachable for finite floats: 17 significant digits always round-trip


def negatives_needed(target: float) -> int:
    """Fewest negatives for which a FAR of ``target`` can be reached by a non-zero FAR: ceil(1 / target)."""
    # round() absorbs float noise such as 1 / 1e-3 == 1000.0000000000001 on some targets.
    return math.ceil(round(1.0 / target, 9))


def check_pairs(scores: ArrayLike, same: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate scored pairs and return them as (N,) float64 scores and (N,) bool labels.

    Raises:
        UsageError: not 1-D, lengths differ, no pairs, a score that is NaN/inf, a label that is not
            0/1/True/False, or only one of the two classes present.
    """
    s = np.asarray(scores)
    y = np.asarray(same)
    if s.ndim != 1 or y.ndim != 1:
        raise UsageError(f"scores and same must be 1-D, got shapes {s.shape} and {y.shape}")
    if len(s) != len(y):
        raise UsageError(f"scores and same must have one entry per pair, got {len(s)} and {len(y)}")
    if len(s) == 0:
        raise UsageError("no pairs to evaluate: scores and same are empty")
    if not np.issubdtype(s.dtype, np.number) or np.issubdtype(s.dtype, np.complexfloating):
        raise UsageError(f"scores must be real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64)
    if not np.isfinite(s).all():
        bad = np.flatnonzero(~np.isfinite(s))
        raise UsageError(f"scores must be finite; {len(bad)} are NaN or inf (first at index {bad[0]})")
    if y.dtype != np.bool_:
        if not np.issubdtype(y.dtype, np.number) or not np.isin(y, (0, 1)).all():
            values = np.unique(y)[:5].tolist()
            raise UsageError(f"same must hold only 0/1 or True/False, got values such as {values}")
        y = y.astype(np.bool_)
    positives = int(y.sum())
    if positives == 0 or positives == len(y):
        raise UsageError(
            "verification needs both same-identity and different-identity pairs; "
            f"got {positives} same and {len(y) - positives} different"
        )
    return s, y


def _roc(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every ROC point, finite thresholds: (fpr, tpr, thresholds), thresholds descending.

    scikit-learn's first point (accept nothing) has threshold +inf; it is replaced by a finite
    score above every score, ``_above_all(s)``, so thresholds can be interpolated and written to
    JSON. ``score >= thresholds[i]`` gives ``fpr[i], tpr[i]``.
    """
    fpr, tpr, thresholds = roc_curve(y.astype(np.int8), s, drop_intermediate=False)
    thresholds = thresholds.astype(np.float64)
    if np.isinf(thresholds[0]):
        thresholds[0] = _above_all(s)
    return fpr, tpr, thresholds


def _above_all(s: np.ndarray) -> float:
    """A threshold above every score: the top score plus half the gap to the next distinct score
    (the midpoint to a mirrored neighbour), or plus 0.5 when all scores are equal."""
    distinct = np.unique(s)
    gap = distinct[-1] - distinct[-2] if len(distinct) > 1 else 1.0
    return float(distinct[-1] + gap / 2)


def _below_all(s: np.ndarray) -> float:
    """A threshold below every score, mirrored from ``_above_all``."""
    distinct = np.unique(s)
    gap = distinct[1] - distinct[0] if len(distinct) > 1 else 1.0
    return float(distinct[0] - gap / 2)


def _eer(fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray) -> tuple[float, float]:
    """(EER, threshold) where FAR - FRR changes sign along the ROC.

    ``FAR - FRR = fpr - (1 - tpr)`` never decreases along the ROC (both rates only grow), and runs
    from -1 (accept nothing) to +1 (accept all), so it crosses zero exactly once.
    """
    gap = fpr - (1.0 - tpr)
    i = int(np.argmax(gap >= 0))  # first point at or past the crossing; i >= 1 because gap[0] = -1
    if gap[i] == 0:
        return float(fpr[i]), float(thresholds[i])
    w = -gap[i - 1] / (gap[i] - gap[i - 1])  # fraction of the way from point i - 1 to point i
    eer = fpr[i - 1] + w * (fpr[i] - fpr[i - 1])  # FRR interpolates to the same value at this w
    threshold = thresholds[i - 1] + w * (thresholds[i] - thresholds[i - 1])
    return float(eer), float(threshold)


def _tar_at_far(fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray, target: float, negatives: int):
    needed = negatives_needed(target)
    if negatives < needed:
        return TarAtFar(target, None, None, None, reason=f"n/a: needs at least {needed} negatives")
    # fpr and tpr never decrease along the ROC, so the last point within the target has the highest TPR.
    i = int(np.searchsorted(fpr, target, side="right")) - 1
    return TarAtFar(target, float(tpr[i]), float(thresholds[i]), float(fpr[i]))


def _check_far_targets(far_targets: Sequence[float]) -> dict[str, float]:
    keyed: dict[str, float] = {}
    for target in far_targets:
        target = float(target)
        if not 0.0 < target < 1.0:
            raise UsageError(f"FAR targets must be fractions in (0, 1), got {target}")
        key = far_key(target)
        if key in keyed:
            raise UsageError(f"FAR target {target} is listed twice")
        keyed[key] = target
    return keyed


def verification_metrics(
    scores: ArrayLike,
    same: ArrayLike,
    far_targets: Sequence[float] = DEFAULT_FAR_TARGETS,
    threshold: float | None = None,
) -> VerificationResult:
    """AUC, EER and TAR at each FAR target of scored pairs; accuracy too when ``threshold`` is given.

    Args:
        scores: (N,) similarity per pair, higher = more alike (e.g. cosine).
        same: (N,) 1/True for a same-identity pair, 0/False otherwise; both kinds must occur.
        far_targets: FAR targets as fractions in (0, 1); results are keyed by ``far_key``.
        threshold: a decision threshold fixed beforehand (``choose_threshold`` on validation pairs);
            it is used as given, ``score >= threshold`` meaning "same".

    Returns:
        A ``VerificationResult``; every rate a fraction in [0, 1]. ``tar_at_far`` is the highest
        TPR at an actual ROC threshold with FPR <= target (not interpolated), or not available
        (None plus a reason) with fewer than ceil(1 / target) negatives.

    Raises:
        UsageError: see ``check_pairs``; a FAR target outside (0, 1) or given twice.
    """
    s, y = check_pairs(scores, same)
    targets = _check_far_targets(far_targets)
    negatives = int((~y).sum())
    fpr, tpr, thresholds = _roc(s, y)
    eer, eer_threshold = _eer(fpr, tpr, thresholds)
    accuracy = None
    if threshold is not None:
        threshold = float(threshold)
        accuracy = _accuracy(s, y, threshold)
    return VerificationResult(
        auc=float(roc_auc_score(y.astype(np.int8), s)),
        eer=eer,
        eer_threshold=eer_threshold,
        tar_at_far={key: _tar_at_far(fpr, tpr, thresholds, t, negatives) for key, t in targets.items()},
        num_positives=len(y) - negatives,
        num_negatives=negatives,
        threshold=threshold,
        accuracy=accuracy,
        fpr=fpr,
        tpr=tpr,
    )


def _accuracy(s: np.ndarray, y: np.ndarray, threshold: float) -> float:
    return float(np.mean((s >= threshold) == y))


def accuracy_at(scores: ArrayLike, same: ArrayLike, threshold: float) -> float:
    """Share of pairs decided correctly (a fraction in [0, 1]) when ``score >= threshold`` means same."""
    if not math.isfinite(threshold):
        raise UsageError(f"threshold must be a finite number, got {threshold}")
    s, y = check_pairs(scores, same)
    return _accuracy(s, y, float(threshold))


def choose_threshold(scores: ArrayLike, same: ArrayLike) -> float:
    """The threshold with the highest verification accuracy on these (validation) pairs.

    Only the position between two neighbouring distinct scores matters, so the threshold returned
    is the midpoint between them (falling back to the upper score if the two are adjacent floats
    with no number between). "Accept all" lies below the lowest score and "accept none" above the
    highest (see ``_below_all`` / ``_above_all``). When several positions reach the same accuracy,
    the highest threshold wins (fewest false accepts), so the answer is deterministic.

    Apply the result unchanged to test pairs: ``verification_metrics(test, ..., threshold=t)``.
    """
    s, y = check_pairs(scores, same)
    fpr, tpr, thresholds = _roc(s, y)
    positives = int(y.sum())
    negatives = len(y) - positives
    # Point i accepts exactly the scores >= thresholds[i]: TP = tpr * P, TN = (1 - fpr) * N.
    accuracy = (tpr * positives + (1.0 - fpr) * negatives) / len(y)
    i = int(np.argmax(accuracy))  # the first maximum: ROC thresholds descend, so the highest one
    if i == 0:
        return float(thresholds[0])  # accept none: already a finite score above all
    upper = float(thresholds[i])
    lower = float(thresholds[i + 1]) if i + 1 < len(thresholds) else _below_all(s)
    middle = (upper + lower) / 2
    return middle if lower < middle <= upper else upper
