"""Scoring verification pairs with a trained model, and measuring the scores.

Each distinct image of a pair list is embedded once (``PairImages`` through any loader, or
``embed_files`` in-process where unreadable files are skipped); a pair's score in each inference
mode is the cosine similarity of its two embeddings. The embeddings are the Re-ID retrieval
vectors (``evaluation.reid.embeddings``): ``sa``, ``glca`` and ``sa+glca`` (the two halves each
L2-normalised, then concatenated, so its cosine is the mean of the two halves' cosines).

``evaluate_pairs`` measures scored pairs per mode with the threshold rule of ``metrics``: the
decision threshold is chosen on *validation* pairs, or given (e.g. stored in a checkpoint), and
applied unchanged; it is never chosen on the pairs being measured.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..data import load_rgb
from ..errors import UsageError
from ..evaluation.reid import embeddings, extract_embeddings
from ..prediction import Skipped, _decode
from ..runtime import autocast
from .metrics import DEFAULT_FAR_TARGETS, VerificationResult, choose_threshold, verification_metrics
from .pairs import Pair
from .pictures import roc_figure, score_histogram


@dataclass
class PairScores:
    """One score per pair and inference mode.

    Args:
        pairs: the pairs, in list order.
        scores: mode -> (N,) float64 cosine similarity of the pair's two embeddings, in [-1, 1].
        source: where the pairs come from (a file name), for reports.
    """

    pairs: list[Pair]
    scores: dict[str, np.ndarray]
    source: str = ""

    @property
    def same(self) -> np.ndarray:
        """(N,) bool, True for a same-identity pair."""
        return np.array([p.same for p in self.pairs], dtype=np.bool_)


def distinct_images(pairs: Iterable[Pair]) -> list[str]:
    """Every image of ``pairs`` once, in order of first appearance."""
    return list(dict.fromkeys(path for pair in pairs for path in (pair.path_a, pair.path_b)))


class PairImages(Dataset):
    """Images by path for ``extract_embeddings``: ``dataset[i] = (transform(image i), i)``.

    Args:
        paths: image paths relative to ``root`` (``distinct_images`` of a pair list).
        root: the folder the paths are relative to (the data root).
        transform: the run's eval transform (decoded RGB array -> tensor).
    """

    def __init__(self, paths: Sequence[str], root: str | Path, transform) -> None:
        self.paths = list(paths)
        self.root = Path(root)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_rgb(self.root / self.paths[index])), index


def cosine_scores(
    vectors: Mapping[str, torch.Tensor], index_a: torch.Tensor, index_b: torch.Tensor
) -> dict[str, np.ndarray]:
    """Cosine similarity (N,) float64 per mode between rows ``index_a`` and ``index_b`` of each (M, D)."""
    scores = {}
    for mode, rows in vectors.items():
        unit = F.normalize(rows.float(), dim=1)
        a, b = unit[index_a.to(unit.device)], unit[index_b.to(unit.device)]  # (N, D) each
        scores[mode] = (a * b).sum(dim=1).double().cpu().numpy()
    return scores


def scores_from_embeddings(
    vectors: Mapping[str, torch.Tensor], paths: Sequence[str], pairs: Sequence[Pair], source: str = ""
) -> PairScores:
    """Score ``pairs`` from embeddings already computed: row i of every mode's (M, D) embeds ``paths[i]``
    (e.g. the validation query and gallery of a Re-ID evaluation, concatenated).

    Raises:
        UsageError: a pair names an image that is not among ``paths``.
    """
    row: dict[str, int] = {}
    for i, path in enumerate(paths):
        row.setdefault(path, i)
    missing = [p for p in distinct_images(pairs) if p not in row]
    if missing:
        raise UsageError(f"{len(missing)} pair image(s) were not embedded, e.g. {missing[:3]}")
    index_a = torch.tensor([row[p.path_a] for p in pairs], dtype=torch.long)
    index_b = torch.tensor([row[p.path_b] for p in pairs], dtype=torch.long)
    return PairScores(list(pairs), cosine_scores(vectors, index_a, index_b), source)


def score_pairs(
    model: nn.Module,
    pairs: Sequence[Pair],
    loader: Iterable,
    device: torch.device,
    modes: Sequence[str],
    amp_dtype: torch.dtype = torch.float32,
    source: str = "",
    show_progress: bool = False,
    tta: str = "none",
) -> PairScores:
    """Embed each image once and score every pair.

    Args:
        loader: iterates a ``PairImages`` over ``distinct_images(pairs)`` in batches (sharded under
            torchrun: ``extract_embeddings`` gathers the shards back into dataset order).
        tta: ``flip``: on flip-averaged embeddings (``evaluation.reid.image_embeddings``).
    """
    dataset = loader.dataset
    if not isinstance(dataset, PairImages):
        raise UsageError(f"score_pairs needs a loader over PairImages, got {type(dataset).__name__}")
    vectors = extract_embeddings(
        model, loader, device, modes, amp_dtype, show_progress, "embed pair images", tta
    )
    return scores_from_embeddings(vectors, dataset.paths, pairs, source)


@torch.no_grad()
def embed_files(
    model: nn.Module,
    paths: Sequence[Path],
    transform,
    device: torch.device,
    modes: Sequence[str],
    amp_dtype: torch.dtype = torch.float32,
    batch_size: int = 32,
) -> tuple[dict[str, torch.Tensor], list[Path], list[Skipped]]:
    """Embeddings (M, D) per mode of the readable files among ``paths``, in one process.

    Returns:
        the embeddings, the M files they belong to (row order), and the files that could not be
        read (missing or undecodable), each with the reason: reported and skipped, as predict.py does.
    """
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    chunks: dict[str, list[torch.Tensor]] = {m: [] for m in modes}
    kept: list[Path] = []
    skipped: list[Skipped] = []
    for start in range(0, len(paths), batch_size):
        # A missing, vanished or undecodable file comes back as Skipped with the reason.
        tensors, readable, bad = _decode(paths[start : start + batch_size], transform)
        skipped += bad
        if not readable:
            continue
        with autocast(device, amp_dtype):
            out = model(torch.stack(tensors).to(device))
        for mode, value in embeddings(model, out, modes).items():
            chunks[mode].append(value.float().cpu())
        kept += readable
    vectors = {m: torch.cat(c) if c else torch.empty(0, 0) for m, c in chunks.items()}
    return vectors, kept, skipped


@dataclass
class PairEvaluation:
    """The verification metrics of one pair list per mode, and how the threshold was decided.

    Args:
        results: mode -> ``VerificationResult``; ``threshold``/``accuracy`` None where no threshold is known.
        thresholds: mode -> the decision threshold applied (only the modes that have one).
        threshold_source: where the thresholds come from ("chosen on the validation pairs ...",
            "stored in ..."), or why there are none.
        num_pairs: pairs measured.
        files: pictures written (roc.png, scores.png).
    """

    results: dict[str, VerificationResult]
    thresholds: dict[str, float]
    threshold_source: str
    num_pairs: int
    files: list[Path] = field(default_factory=list)

    @property
    def primary_mode(self) -> str:
        return "sa+glca" if "sa+glca" in self.results else "sa"

    def as_json(self) -> dict[str, dict[str, Any]]:
        """``{mode: {auc, eer, eer_threshold, tar_at_far, tar_at_far_reason, threshold, accuracy,
        accuracy_reason, num_positives, num_negatives}}``; every rate a fraction in [0, 1];
        ``accuracy_reason`` says why ``accuracy`` is None (else None)."""
        document = {}
        for mode, result in self.results.items():
            reason = None if result.accuracy is not None else f"n/a: {self.threshold_source}"
            document[mode] = {**result.as_dict(), "accuracy_reason": reason}
        return document

    def columns(self, prefix: str = "eval") -> dict[str, float]:
        """metrics.csv columns: ``{prefix}_auc_<mode>``, ``_eer_``, ``_threshold_`` (sa+glca -> sa_glca)."""
        row = {}
        for mode, r in self.results.items():
            name = mode.replace("+", "_")
            row.update({f"{prefix}_auc_{name}": r.auc, f"{prefix}_eer_{name}": r.eer})
            row[f"{prefix}_threshold_{name}"] = r.threshold if r.threshold is not None else float("nan")
        return row

    def summary_line(self) -> str:
        """One log line: the pair counts, then AUC, EER and threshold per mode."""
        first = next(iter(self.results.values()))
        modes = "/".join(self.results)

        def joined(values: Iterable[float | None]) -> str:
            return "/".join("n/a" if v is None else f"{v:.4f}" for v in values)

        results = self.results.values()
        return (
            f"{first.num_positives} same / {first.num_negatives} different pairs: {modes} AUC "
            f"{joined(r.auc for r in results)}, EER {joined(r.eer for r in results)}, "
            f"threshold {joined(r.threshold for r in results)}"
        )


def thresholds_on(val: PairScores) -> dict[str, float]:
    """Per mode, the threshold of highest accuracy on these validation pairs (``choose_threshold``)."""
    return {mode: choose_threshold(scores, val.same) for mode, scores in val.scores.items()}


def evaluate_pairs(
    scores: PairScores,
    *,
    val: PairScores | None = None,
    thresholds: Mapping[str, float] | None = None,
    threshold_source: str = "",
    far_targets: Sequence[float] = DEFAULT_FAR_TARGETS,
    out_dir: str | Path | None = None,
) -> PairEvaluation:
    """AUC, EER, TAR@FAR per mode of ``scores``, and accuracy at a threshold decided beforehand.

    Args:
        scores: the pairs to measure (e.g. test pairs).
        val: validation pairs: each mode's threshold is chosen on them (``thresholds_on``), then
            applied unchanged to ``scores``. Passing the measured pairs themselves is only right
            when they are the validation pairs (the trainer does that to report them).
        thresholds: thresholds fixed elsewhere (e.g. stored in a checkpoint), mode -> threshold; a
            mode without one gets no accuracy.
        threshold_source: with ``thresholds``: where they come from; with neither: why there is no
            threshold (reported as the accuracy's "n/a" reason).
        far_targets: FARs that TAR is reported at.
        out_dir: when given, write ``roc.png`` (every mode) and ``scores.png`` (the primary mode's
            score histograms with its threshold) there.

    Raises:
        UsageError: both ``val`` and ``thresholds`` given, or pairs of one kind only.
    """
    if val is not None and thresholds is not None:
        raise UsageError("give validation pairs or thresholds, not both: the threshold has one source")
    if val is not None:
        chosen = thresholds_on(val)
        threshold_source = f"chosen on the validation pairs {val.source}".rstrip()
    else:
        chosen = {m: float(t) for m, t in (thresholds or {}).items() if m in scores.scores}
        if not threshold_source:
            threshold_source = "given" if chosen else "no threshold was given"
    same = scores.same
    results = {
        mode: verification_metrics(values, same, far_targets, threshold=chosen.get(mode))
        for mode, values in scores.scores.items()
    }
    evaluation = PairEvaluation(results, chosen, threshold_source, len(scores.pairs))
    if out_dir is not None:
        out = Path(out_dir)
        curves = {mode: (r.fpr, r.tpr) for mode, r in results.items()}
        primary = evaluation.primary_mode
        evaluation.files = [
            roc_figure(curves, out / "roc.png"),
            score_histogram(
                scores.scores[primary],
                same,
                chosen.get(primary),
                out / "scores.png",
                title=f"pair scores: {primary} cosine similarity",
            ),  # fmt: skip
        ]
    return evaluation


def format_pair_table(evaluation: PairEvaluation) -> list[str]:
    """Plain-text lines: AUC, EER, TAR at each FAR and accuracy per mode, then the threshold rule."""
    first = next(iter(evaluation.results.values()))
    fars = list(first.tar_at_far)
    header = f"{'mode':<8} {'AUC':>7} {'EER':>7} " + " ".join(f"{'TAR@' + k:>12}" for k in fars)
    lines = [header + f" {'threshold':>10} {'accuracy':>9}"]
    for mode, r in evaluation.results.items():
        tars = " ".join(f"{p.tar:12.4f}" if p.available else f"{'n/a':>12}" for p in r.tar_at_far.values())
        threshold = f"{r.threshold:10.4f}" if r.threshold is not None else f"{'n/a':>10}"
        accuracy = f"{r.accuracy:9.4f}" if r.accuracy is not None else f"{'n/a':>9}"
        lines.append(f"{mode:<8} {r.auc:7.4f} {r.eer:7.4f} {tars} {threshold} {accuracy}")
    reasons = {key: p.reason for key, p in first.tar_at_far.items() if p.reason}
    lines += [f"TAR@{key}: {reason}" for key, reason in reasons.items()]
    lines.append(f"threshold: {evaluation.threshold_source}")
    return lines
