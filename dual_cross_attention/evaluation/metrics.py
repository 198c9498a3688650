"""Counting predictions on a labelled split: the one tally behind every accuracy this package reports.

For each inference mode (``sa``, ``glca``, ``sa+glca``) a ``Tally`` keeps per-class sums (a
confusion matrix and top-5 hits per class). Sums from disjoint shards add up, so a
multi-process run all-reduces ``Tally.tensors()`` and nothing else; top-1, top-5 and mean
per-class accuracy (the official FGVC-Aircraft metric: the mean over classes of each class's
top-1) are derived from the tally afterwards. Training-time evaluation (``engine.evaluate``)
and ``evaluate.py`` both count with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

TOP_K = 5


@dataclass
class Tally:
    """Per-class sums over the evaluated images, per mode. Every field is a sum over images, so
    tallies of disjoint shards combine by adding their ``tensors()`` (an all-reduce SUM)."""

    num_classes: int
    confusion: dict[str, torch.Tensor]  # mode -> (K, K) int64; rows true class, columns top-1 prediction
    top5_hits: dict[str, torch.Tensor]  # mode -> (K,) int64; images of each class with the label in the top 5

    @classmethod
    def zeros(cls, num_classes: int, modes: Sequence[str], device: torch.device | str = "cpu") -> Tally:
        square = (num_classes, num_classes)
        return cls(
            num_classes=num_classes,
            confusion={m: torch.zeros(square, dtype=torch.int64, device=device) for m in modes},
            top5_hits={m: torch.zeros(num_classes, dtype=torch.int64, device=device) for m in modes},
        )

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(self.confusion)

    @property
    def num_images(self) -> int:
        return int(self.confusion[self.modes[0]].sum().item())

    def tensors(self) -> list[torch.Tensor]:
        """Every count, in a fixed order: what a distributed run all-reduces."""
        return [self.confusion[m] for m in self.modes] + [self.top5_hits[m] for m in self.modes]

    def add(self, mode: str, scores: torch.Tensor, labels: torch.Tensor) -> None:
        """Count a batch: ``scores`` (B, K) of any monotone kind (probabilities, logits), ``labels`` (B,)."""
        k, n = min(TOP_K, self.num_classes), self.num_classes
        ranked = scores.topk(k, dim=1).indices  # (B, k)
        pairs = labels * n + ranked[:, 0]
        self.confusion[mode] += torch.bincount(pairs, minlength=n * n).view(n, n)
        in_top = (ranked == labels[:, None]).any(dim=1)
        self.top5_hits[mode] += torch.bincount(labels[in_top], minlength=n)


def require_each_image_once(counted: int, expected: int, description: str) -> None:
    """The split has ``expected`` images; anything else means images were dropped or repeated."""
    if counted != expected:
        raise RuntimeError(
            f"evaluated {counted} images but {description} has {expected}: every image must be counted "
            "exactly once (a distributed sampler that pads shards repeats images; use one that does not)"
        )


def mode_metrics(confusion: np.ndarray, top5_hits: np.ndarray) -> dict[str, float]:
    """top1, top5 and mean_class (percent) from one mode's confusion matrix and top-5 hits.

    mean_class averages over the classes that have images in the split.
    """
    counts = confusion.sum(axis=1)
    n = counts.sum()
    if n == 0:
        raise ValueError("no images were evaluated")
    present = counts > 0
    per_class = np.diag(confusion)[present] / counts[present]
    return {
        "top1": float(100.0 * np.trace(confusion) / n),
        "top5": float(100.0 * top5_hits.sum() / n),
        "mean_class": float(100.0 * per_class.mean()),
    }


def column_name(mode: str) -> str:
    """``sa+glca`` -> ``sa_glca``, as in metrics.csv."""
    return mode.replace("+", "_")


@dataclass
class Summary:
    """What a tally says, on the host."""

    metrics: dict[str, dict[str, float]]  # mode -> top1/top5/mean_class (%)
    num_images: int
    confusion: dict[str, np.ndarray]  # mode -> (K, K) counts
    per_class: pd.DataFrame  # class, count, accuracy_<mode> (%, NaN for a class without images)

    @property
    def primary_mode(self) -> str:
        """The paper's inference rule when the model has GLCA, else SA."""
        return "sa+glca" if "sa+glca" in self.metrics else "sa"


def summarize(tally: Tally, classes: Sequence[str]) -> Summary:
    confusion = {m: c.cpu().numpy() for m, c in tally.confusion.items()}
    hits = {m: h.cpu().numpy() for m, h in tally.top5_hits.items()}
    counts = next(iter(confusion.values())).sum(axis=1)
    per_class = pd.DataFrame({"class": list(classes), "count": counts})
    with np.errstate(invalid="ignore", divide="ignore"):  # a class without images: NaN, on purpose
        for mode, matrix in confusion.items():
            per_class[f"accuracy_{column_name(mode)}"] = 100.0 * np.diag(matrix) / counts
    return Summary(
        metrics={m: mode_metrics(confusion[m], hits[m]) for m in confusion},
        num_images=tally.num_images,
        confusion=confusion,
        per_class=per_class,
    )
