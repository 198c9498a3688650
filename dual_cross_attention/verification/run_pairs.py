"""The verification pairs of a run: drawn from its identities, kept in the run folder, reused.

Validation pairs come from the identities held out of training (``data.val_fraction`` > 0: the
very query and gallery images the validation mAP ranks); test pairs from the test query and
gallery identities. Market-1501 and DukeMTMC-reID put their distractors (many people) under pid 0,
so pid 0 is no identity there and is left out. Identities are named by pid (``reid_folder``: by
folder name), which is how a hard-negative file (``identity_a,identity_b``) names them.

A list is written to ``<run>/verification/<split>_pairs.csv`` (image paths relative to
``data.root``) with ``<split>_pairs.json`` beside it saying how it was drawn. A later call with the
same settings and the same source images reads the file back instead of drawing again, so a
model is selected and measured on exactly the pairs on disk; other settings draw a new list.

This is the glue between the config and ``pairs``; ``pairs.generate_pairs`` does the drawing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..builders import DataBundle, build_reid_data
from ..config import Config
from ..data.reid import ReIDRecord
from ..errors import UsageError
from .pairs import (
    Pair,
    PairFileError,
    generate_pairs,
    read_identities,
    read_identity_pairs,
    read_pairs,
    write_pairs,
)
from .scoring import PairEvaluation, evaluate_pairs, scores_from_embeddings

_logger = logging.getLogger(__name__)

PAIRS_FOLDER = "verification"
SPLITS = ("val", "test")
DISTRACTOR_PID = {"market1501": 0, "dukemtmc": 0}  # layouts whose pid 0 holds distractors


@dataclass(frozen=True)
class PairSettings:
    """How pairs are drawn (``generate_pairs``'s arguments; see ``config.VerificationConfig``)."""

    seed: int
    max_positives_per_identity: int | None
    num_negatives: int | None
    hard_negatives: str | None  # CSV of identity pairs; None: negatives across any identities


def pair_settings(cfg: Config) -> PairSettings:
    v = cfg.verification
    return PairSettings(v.pairs_seed, v.max_positives_per_identity, v.num_negatives, v.hard_negatives)


@dataclass
class RunPairs:
    """A pair list of a run and the file that holds it."""

    pairs: list[Pair]
    path: Path
    reused: bool  # read back from ``path`` (else drawn now)


def run_dir_of(checkpoint: Path) -> Path:
    """The run folder of a checkpoint: the parent of its ``checkpoints/`` folder (else its own folder)."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def pairs_path(run_dir: Path, split: str) -> Path:
    return run_dir / PAIRS_FOLDER / f"{split}_pairs.csv"


def relative_path(path: str | Path, root: str | Path) -> str:
    """``path`` relative to ``root``, with forward slashes (how pair files name images)."""
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(root))).as_posix()


def reid_identities(
    records: Iterable[ReIDRecord], root: str | Path, layout: str, identity_names: Sequence[str] = ()
) -> dict[str, list[str]]:
    """``{identity: [image paths relative to root]}`` of Re-ID records; pid 0 of ``DISTRACTOR_PID``
    layouts is left out, an image listed twice (a query that is also a gallery entry) counts once."""
    distractor = DISTRACTOR_PID.get(layout)
    identities: dict[str, list[str]] = {}
    for record in records:
        if record.pid == distractor:
            continue
        name = identity_names[record.pid] if identity_names else str(record.pid)
        identities.setdefault(name, []).append(relative_path(record.path, root))
    return {name: list(dict.fromkeys(images)) for name, images in identities.items()}


def _hard_negatives(settings: PairSettings, identities: dict[str, list[str]], what: str, required: bool):
    """The listed identity pairs with both identities among ``identities``, or None for random
    negatives. Pairs that straddle splits (one identity elsewhere) do not apply here."""
    if settings.hard_negatives is None:
        return None
    listed = read_identity_pairs(settings.hard_negatives)
    applicable = [(a, b) for a, b in listed if a in identities and b in identities]
    _logger.info("%s: %d of the %d identity pairs in %s apply (both identities among its %d)", what,
                 len(applicable), len(listed), settings.hard_negatives, len(identities))  # fmt: skip
    if applicable:
        return applicable
    message = (
        f"none of the {len(listed)} identity pairs in {settings.hard_negatives} (verification."
        f"hard_negatives) has both identities among the {len(identities)} identities of the {what}"
    )
    if required:
        raise UsageError(message + "; identities are named by pid (reid_folder: by folder name)")
    _logger.warning("%s: negatives are drawn across any two identities instead", message)
    return None


def draw_pairs(
    identities: dict[str, list[str]], settings: PairSettings, what: str, hard_required: bool = True
) -> list[Pair]:
    """``generate_pairs`` with ``settings``; hard negatives restricted to this split's identities.

    Args:
        what: the pairs' source in words, for the log.
        hard_required: with ``settings.hard_negatives``, an error when none applies (else a warning
            and random negatives: validation identities rarely hold both of a listed pair).
    """
    hard = _hard_negatives(settings, identities, what, hard_required)
    pairs = generate_pairs(
        identities, seed=settings.seed, max_positives_per_identity=settings.max_positives_per_identity,
        num_negatives=settings.num_negatives, hard_negatives=hard,
    )  # fmt: skip
    positives = sum(p.same for p in pairs)
    _logger.info("%s: drew %d same-identity and %d different-identity pairs from %d identities", what,
                 positives, len(pairs) - positives, len(identities))  # fmt: skip
    return pairs


def _file_digest(path: str | None) -> str | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise PairFileError(f"{path}: no such file (verification.hard_negatives: CSV identity_a,identity_b)")
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _source_records(cfg: Config, split: str, data: DataBundle | None) -> tuple[DataBundle, list[ReIDRecord]]:
    if split not in SPLITS:
        raise UsageError(f"a run's pairs are 'val' or 'test' pairs, got {split!r}")
    if cfg.task != "reid":
        raise UsageError(
            f"generated pairs need identities: {cfg.data.dataset} is not a Re-ID dataset; pass a pair list "
            "(CSV path_a,path_b,same) or an identity mapping (JSON {identity: [image paths]})"
        )
    if data is None:
        data = build_reid_data(cfg, split="selection" if split == "val" else "test")
    if split == "val" and data.eval_split != "val":
        raise UsageError(
            "validation pairs come from validation identities, and this run has none (data.val_fraction: "
            f"{cfg.data.val_fraction}); train with data.val_fraction > 0, or pass a validation pair list"
        )
    return data, list(data.eval.records) + list(data.gallery.records)


def run_pairs(
    cfg: Config, split: str, run_dir: Path, data: DataBundle | None = None, write: bool = True
) -> RunPairs:
    """The run's ``split`` pairs: read back from the run folder when drawn before with the same
    settings from the same images, else drawn now and written. Without ``write`` (the other ranks
    under torchrun, while rank 0 may be writing) the files are not touched: the pairs are drawn
    (deterministically, so the same as rank 0's).

    Args:
        split: ``val`` (the held-out validation identities) or ``test`` (test query + gallery).
        data: the run's data for ``split`` when already built (``build_reid_data``), else built here.
    """
    data, records = _source_records(cfg, split, data)
    identities = reid_identities(records, cfg.data.root, data.reid.dataset, data.reid.identity_names)
    settings = pair_settings(cfg)
    drawn_with: dict[str, Any] = {
        "split": split,
        "dataset": cfg.data.dataset,
        "data_root": cfg.data.root,
        "val_fraction": cfg.data.val_fraction,
        "val_seed": cfg.data.val_seed,
        **asdict(settings),
        "hard_negatives_sha256": _file_digest(settings.hard_negatives),
        "identities": len(identities),
        "images": sum(len(v) for v in identities.values()),
    }
    path = pairs_path(run_dir, split)
    sidecar = path.with_suffix(".json")
    if write and path.is_file() and sidecar.is_file():
        before = json.loads(sidecar.read_text())
        if before == drawn_with:
            _logger.info("%s pairs: reusing %s (drawn before with the same settings)", split, path)
            return RunPairs(read_pairs(path, root=cfg.data.root), path, reused=True)
        changed = sorted(k for k in drawn_with if before.get(k) != drawn_with[k])
        _logger.warning("%s: drawn with other settings (%s differ): drawing anew", path, ", ".join(changed))
    what = "validation identities" if split == "val" else "test identities"
    pairs = draw_pairs(identities, settings, what, hard_required=split == "test")
    if write:
        sidecar.unlink(missing_ok=True)  # the CSV is only reused once its sidecar is written after it
        write_pairs(pairs, path)
        sidecar.write_text(json.dumps(drawn_with, indent=2) + "\n")
        _logger.info("wrote %s", path)
    return RunPairs(pairs, path, reused=False)


def pairs_from_mapping(
    json_path: str | Path, settings: PairSettings, out_csv: Path, write: bool = True
) -> list[Pair]:
    """Pairs drawn from a JSON ``{identity: [image paths]}`` mapping, written to ``out_csv``."""
    identities = read_identities(json_path)
    pairs = draw_pairs(identities, settings, f"identities of {json_path}")
    if write:
        write_pairs(pairs, out_csv)
        _logger.info("wrote %s", out_csv)
    return pairs


def has_both_kinds(pairs: Sequence[Pair]) -> bool:
    """Whether the list holds same-identity and different-identity pairs (verification needs both)."""
    kinds = {p.same for p in pairs}
    return kinds == {True, False}


def training_pairs(cfg: Config, data: DataBundle, run_dir: Path, write: bool) -> RunPairs | None:
    """The validation pairs a Re-ID run scores every epoch, or None without validation identities
    (or, unless ``train.select_metric`` is ``auc``, when they give pairs of one kind only)."""
    if cfg.task != "reid" or data.eval_split != "val":
        return None
    drawn = run_pairs(cfg, "val", run_dir, data=data, write=write)
    if has_both_kinds(drawn.pairs):
        return drawn
    message = (
        f"the validation identities give {sum(p.same for p in drawn.pairs)} same-identity and "
        f"{sum(not p.same for p in drawn.pairs)} different-identity pairs; verification needs both (raise "
        "data.val_fraction or verification.max_positives_per_identity)"
    )
    if cfg.train.select_metric == "auc":
        raise UsageError(f"train.select_metric: auc: {message}")
    _logger.warning("no validation pair verification: %s", message)
    return None


def score_validation(
    features: dict[str, dict[str, Any]], data: DataBundle, root: str | Path, drawn: RunPairs, far_targets
) -> PairEvaluation:
    """The validation pairs scored on the query/gallery embeddings a Re-ID evaluation already
    computed (``evaluate_reid(..., keep_features=True)``: no second forward), each mode's threshold
    chosen on these pairs, as the checkpoint stores it."""
    paths = [relative_path(p, root) for p in list(data.eval.paths) + list(data.gallery.paths)]
    vectors = {
        mode: torch.cat([features["query"][mode], features["gallery"][mode]]) for mode in features["query"]
    }
    scores = scores_from_embeddings(vectors, paths, drawn.pairs, str(drawn.path))
    return evaluate_pairs(scores, val=scores, far_targets=far_targets)
