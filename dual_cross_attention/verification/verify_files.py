"""Decide whether image files show the same identity, with a checkpoint: what ``verify.py`` runs.

Each distinct file is embedded once; a pair's score in each mode is the cosine similarity of its
two embeddings, and the decision at a threshold ``t`` is "same" when ``score >= t``. The threshold
is the one given (``--threshold``) or the one the trainer chose on its validation pairs and
stored in the checkpoint; without either the decision is unknown and the report says how to get
one. Unreadable files are reported and skipped (with every pair they are in), as predict.py does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from ..builders import normalization
from ..data import load_rgb
from ..errors import UsageError
from ..evaluation.report import to_uint8
from ..prediction import Skipped, TrainedModel
from ..runtime import autocast
from ..visualize import AttentionExample
from .checkpoint_pairs import pair_transform, stored_verification
from .pictures import pair_figure
from .scoring import cosine_scores, embed_files

SAME, DIFFERENT, UNKNOWN = "same", "different", "unknown"
NAME_CHARS = 24  # a file name in a picture title is cut to this many characters


@dataclass(frozen=True)
class ScoredPair:
    """Two files and their cosine similarity per mode; ``same`` is the label when the list has one."""

    path_a: Path
    path_b: Path
    scores: dict[str, float]
    same: bool | None = None


@dataclass(frozen=True)
class Threshold:
    """The decision threshold of one mode, or None with ``source`` saying why none is known."""

    mode: str
    value: float | None
    source: str


def decide(score: float, threshold: float | None) -> str:
    """``same`` when ``score >= threshold``, else ``different``; ``unknown`` without a threshold."""
    if threshold is None:
        return UNKNOWN
    return SAME if score >= threshold else DIFFERENT


def resolve_threshold(trained: TrainedModel, mode: str, given: float | None) -> Threshold:
    """``given`` (``--threshold``) when set, else the checkpoint's stored threshold of ``mode``."""
    if given is not None:
        if not math.isfinite(given):
            raise UsageError(f"--threshold must be a finite number, got {given}")
        return Threshold(mode, float(given), "given by --threshold")
    thresholds, source = stored_verification(trained)
    if mode in thresholds:
        return Threshold(mode, thresholds[mode], source)
    if thresholds:
        source = f"no threshold is known for {mode}: the checkpoint stores ones for {sorted(thresholds)}"
    how = (
        "pass --threshold T (python evaluate.py --checkpoint CKPT --pairs PAIRS.csv --val-pairs VAL.csv "
        "prints the one chosen on validation pairs), or train with data.val_fraction > 0 so that the "
        "checkpoint stores it"
    )
    return Threshold(mode, None, f"{source}; {how}")


def verify_pairs(
    trained: TrainedModel, pairs: Sequence[tuple[Path, Path, bool | None]], batch_size: int = 32
) -> tuple[list[ScoredPair], list[Skipped]]:
    """Score each pair whose two files can be read; the unreadable files come back as Skipped (each
    once), and the pairs they are in are left out."""
    paths = list(dict.fromkeys(p for a, b, _ in pairs for p in (a, b)))
    vectors, kept, skipped = embed_files(
        trained.model, paths, pair_transform(trained.config), trained.device, trained.modes,
        trained.amp_dtype, batch_size,
    )  # fmt: skip
    row = {path: i for i, path in enumerate(kept)}
    readable = [(a, b, same) for a, b, same in pairs if a in row and b in row]
    if not readable:
        return [], skipped
    index_a = torch.tensor([row[a] for a, _, _ in readable])
    index_b = torch.tensor([row[b] for _, b, _ in readable])
    scores = cosine_scores(vectors, index_a, index_b)
    scored = [
        ScoredPair(a, b, {mode: float(values[i]) for mode, values in scores.items()}, same)
        for i, (a, b, same) in enumerate(readable)
    ]
    return scored, skipped


def _skipped_lines(skipped: Sequence[Skipped], pairs_left_out: int) -> list[str]:
    if not skipped:
        return []
    lines = [f"skipped {len(skipped)} unreadable file(s) and the {pairs_left_out} pair(s) they are in:"]
    return lines + [f"  {s.path}: {s.reason}" for s in skipped]


def format_single(pair: ScoredPair, threshold: Threshold, stored: dict[str, float]) -> str:
    """The report of one pair: the similarity per mode (with each mode's stored threshold and
    decision), then the decision of ``threshold.mode``."""
    lines = [f"{pair.path_a}  vs  {pair.path_b}", f"{'mode':<8} {'cosine':>8} {'threshold':>10}  decision"]
    for mode, score in pair.scores.items():
        t = threshold.value if mode == threshold.mode else stored.get(mode)
        shown = f"{t:10.4f}" if t is not None else f"{'n/a':>10}"
        lines.append(f"{mode:<8} {score:8.4f} {shown}  {decide(score, t)}")
    score = pair.scores[threshold.mode]
    if threshold.value is None:
        lines.append(f"decision ({threshold.mode}): {UNKNOWN}: {threshold.source}")
    else:
        verdict = decide(score, threshold.value)
        sign = ">=" if verdict == SAME else "<"
        lines.append(
            f"decision ({threshold.mode}): {verdict} (cosine {score:.4f} {sign} threshold "
            f"{threshold.value:.4f}, {threshold.source})"
        )
    return "\n".join(lines)


def format_many(
    pairs: Sequence[ScoredPair], threshold: Threshold, skipped: Sequence[Skipped], total: int
) -> str:
    """One line per scored pair (cosine and decision of ``threshold.mode``), a summary, the skipped files."""
    mode, t = threshold.mode, threshold.value
    if not pairs:
        return "\n".join(_skipped_lines(skipped, total))
    lines = []
    for p in pairs:
        label = "" if p.same is None else f"  (label: {SAME if p.same else DIFFERENT})"
        lines.append(
            f"{p.path_a}  {p.path_b}  {mode} cosine {p.scores[mode]:.4f}  {decide(p.scores[mode], t)}{label}"
        )
    decisions = [decide(p.scores[mode], t) for p in pairs]
    if t is None:
        lines.append(f"{len(pairs)} pair(s) scored, none decided: {threshold.source}")
    else:
        summary = (
            f"{len(pairs)} pair(s) decided at {mode} threshold {t:.4f} ({threshold.source}): "
            f"{decisions.count(SAME)} same, {decisions.count(DIFFERENT)} different"
        )
        labelled = [(p, d) for p, d in zip(pairs, decisions, strict=True) if p.same is not None]
        if labelled:
            right = sum((d == SAME) == p.same for p, d in labelled)
            summary += (
                f"; {right} of the {len(labelled)} labelled pairs decided right ({right / len(labelled):.4f})"
            )
        lines.append(summary)
    lines += _skipped_lines(skipped, total - len(pairs))
    return "\n".join(lines)


def decisions_frame(pairs: Sequence[ScoredPair], threshold: Threshold) -> pd.DataFrame:
    """One row per pair: path_a, path_b, cosine_<mode> for each mode (sa+glca -> sa_glca), mode,
    threshold, decision, and same/correct when the pair has a label."""
    rows = []
    for p in pairs:
        row: dict[str, object] = {"path_a": str(p.path_a), "path_b": str(p.path_b)}
        row.update({f"cosine_{m.replace('+', '_')}": s for m, s in p.scores.items()})
        decision = decide(p.scores[threshold.mode], threshold.value)
        row.update(mode=threshold.mode, threshold=threshold.value, decision=decision)
        if p.same is not None:
            row.update(
                same=int(p.same), correct=None if decision == UNKNOWN else int((decision == SAME) == p.same)
            )
        rows.append(row)
    return pd.DataFrame(rows)


def _short(name: str) -> str:
    return name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 3] + "..."


@torch.no_grad()
def pair_examples(trained: TrainedModel, paths: tuple[Path, Path]) -> list[AttentionExample]:
    """Both images as the model saw them, with their rollout over the patch grid and GLCA's patches."""
    model = trained.model
    if not model.use_glca:
        raise UsageError("--picture needs the GLCA branch (rollout); this model has model.glca: false")
    transform = pair_transform(trained.config)
    images = torch.stack([transform(load_rgb(p)) for p in paths]).to(trained.device)  # (2, 3, H, W)
    with autocast(trained.device, trained.amp_dtype):
        out = model.eval()(images)
    gh, gw = model.backbone.patch_embed.grid_size
    rollout = out.rollout.float().view(len(paths), gh, gw).cpu().numpy()  # (2, gh, gw)
    pixels = to_uint8(images, *normalization(trained.config))
    return [
        AttentionExample(
            pixels[i], rollout[i], out.local_index[i].cpu().numpy(), _short(p.name), _short(p.name)
        )
        for i, p in enumerate(paths)
    ]


def draw_pair(trained: TrainedModel, pair: ScoredPair, threshold: Threshold, out_png: str | Path) -> Path:
    """Both images side by side with their rollout and GLCA patches; the title gives the decision."""
    first, second = pair_examples(trained, (pair.path_a, pair.path_b))
    score = pair.scores[threshold.mode]
    decision = decide(score, threshold.value)
    at = "no threshold known" if threshold.value is None else f"threshold {threshold.value:.4f}"
    title = f"{threshold.mode} cosine {score:.4f}, {at}\ndecision: {decision}"
    return pair_figure(first, second, title, out_png)
