"""Carving a validation split out of a training split, stratified by class and seeded."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def stratified_split(targets: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices into (train, val) so each class keeps about ``val_fraction`` of its images for val.

    Each class with n >= 2 images gives ``max(1, round(val_fraction * n))`` of them to val (and
    keeps at least one for training); a class with a single image stays in train. Depends only on
    ``targets`` and ``seed``, so every process and every run picks the same images.

    Returns:
        Sorted train indices and sorted val indices; together they are all indices, disjoint.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = np.asarray(targets, dtype=np.int64)
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            continue
        count = min(max(1, round(val_fraction * len(members))), len(members) - 1)
        val += rng.permutation(members)[:count].tolist()
    val_set = set(val)
    train = [i for i in range(len(labels)) if i not in val_set]
    return train, sorted(val)
