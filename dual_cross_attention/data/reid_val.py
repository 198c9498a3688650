"""A validation split for Re-ID, carved out of the training identities.

The Re-ID benchmarks define train, query and gallery only, so choosing best.pt on them would pick
the epoch on the very ranking that is reported. Instead a fraction of the training identities is
held out whole (their images never train the model): each held-out identity gives one query
image, and its other images form the validation gallery, ranked with the same protocol as the
test set. Only identities seen by at least two cameras are held out (the same-camera images of a
query are removed from its gallery, so one camera would leave nothing to find); without camera
ids, any identity with at least two images.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..errors import UsageError
from .reid import ReIDRecord


@dataclass(frozen=True)
class ReIDValidation:
    train: tuple[ReIDRecord, ...]  # the remaining training records, labels 0..C'-1 again
    query: tuple[ReIDRecord, ...]  # one image per held-out identity (label == pid)
    gallery: tuple[ReIDRecord, ...]  # the other images of the held-out identities


def carve_reid_validation(train: Sequence[ReIDRecord], fraction: float, seed: int) -> ReIDValidation:
    """Hold out ``round(fraction x identities)`` (at least one) eligible training identities, drawn
    with ``seed``; the query of each is one of its images drawn likewise."""
    by_pid: dict[int, list[ReIDRecord]] = defaultdict(list)
    for record in train:
        by_pid[record.pid].append(record)
    pids = sorted(by_pid)
    has_cameras = any(r.camid >= 0 for r in train)

    def eligible(records: list[ReIDRecord]) -> bool:
        return len({r.camid for r in records}) >= 2 if has_cameras else len(records) >= 2

    candidates = [pid for pid in pids if eligible(by_pid[pid])]
    wanted = max(1, round(fraction * len(pids)))
    if len(candidates) < wanted or wanted >= len(pids):
        rule = "seen by two or more cameras" if has_cameras else "with two or more images"
        raise UsageError(
            f"data.val_fraction={fraction} asks for {wanted} validation identities out of {len(pids)} "
            f"training identities, but only {len(candidates)} are {rule} (and at least one must stay for "
            "training); lower data.val_fraction or set it to 0"
        )
    rng = np.random.default_rng([seed, 7])
    held_out = set(rng.choice(candidates, size=wanted, replace=False).tolist())
    query, gallery = [], []
    for pid in sorted(held_out):
        records = sorted(by_pid[pid], key=lambda r: str(r.path))
        index = int(rng.integers(len(records)))
        for i, record in enumerate(records):
            (query if i == index else gallery).append(replace(record, label=record.pid))
    kept = [pid for pid in pids if pid not in held_out]
    label_of = {pid: label for label, pid in enumerate(kept)}
    remaining = tuple(replace(r, label=label_of[r.pid]) for r in train if r.pid not in held_out)
    return ReIDValidation(train=remaining, query=tuple(query), gallery=tuple(gallery))
