"""Verify pairs with a training checkpoint: ``evaluate.py --pairs [PAIRS] [--val-pairs [VAL]]``.

A pair argument is a pair list (CSV ``path_a,path_b,same``, image paths relative to
``data.root``), an identity mapping (JSON ``{identity: [image paths]}``, pairs drawn from it with
the run's ``verification`` settings and written to the output folder), or ``RUN_PAIRS`` for the
run's own generated pairs (``run_pairs``: test pairs for ``--pairs``, the held-out validation
identities' pairs for ``--val-pairs``).

The threshold rule: with validation pairs, each mode's threshold is chosen on them; without, the
threshold the trainer chose on its validation pairs and stored in the checkpoint is used; with
neither, accuracy is reported as n/a with the reason. It is never chosen on the measured pairs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..builders import build_eval_loader, build_eval_pipeline, normalization
from ..config import Config, image_hw
from ..data.reid_transforms import build_reid_eval_transform
from ..data.transforms import ImagePipeline
from ..distributed import DistInfo
from ..errors import UsageError
from ..evaluation.report import write_json
from ..prediction import TrainedModel
from ..provenance import evaluation_provenance, format_provenance
from .pairs import Pair, read_pairs
from .run_pairs import pair_settings, pairs_from_mapping, run_dir_of, run_pairs
from .scoring import (
    PairEvaluation,
    PairImages,
    PairScores,
    distinct_images,
    evaluate_pairs,
    format_pair_table,
    score_pairs,
)

_logger = logging.getLogger(__name__)

RUN_PAIRS = "run"  # the value of a bare --pairs / --val-pairs: the run's own generated pairs


def pair_transform(cfg: Config) -> ImagePipeline:
    """The run's eval transform: Re-ID resize to (H, W), FGVC resize + center crop; then normalize."""
    if cfg.task == "reid":
        mean, std = normalization(cfg)
        return build_reid_eval_transform(image_hw(cfg.data.img_size), mean, std)
    return build_eval_pipeline(cfg)


def stored_verification(trained: TrainedModel) -> tuple[dict[str, float], str]:
    """The thresholds the trainer chose on its validation pairs and stored in the checkpoint, and a
    sentence saying so (or, without any, why and how to get one)."""
    stored = trained.verification or {}
    thresholds = {m: float(t) for m, t in stored.get("thresholds", {}).items()}
    name = trained.checkpoint.name
    if thresholds:
        pairs = stored.get("pairs", "?")
        return thresholds, f"chosen on the validation pairs {pairs} in training (stored in {name})"
    cfg = trained.config
    if cfg.task != "reid":
        why = "an FGVC run chooses no verification threshold"
    elif cfg.data.val_fraction == 0:
        why = "it was trained without validation identities (data.val_fraction: 0)"
    else:
        why = "it was written before verification thresholds were stored"
    return {}, f"no threshold is known: {name} stores none ({why})"


def load_pair_argument(
    argument: str, trained: TrainedModel, split: str, out_dir: Path, write: bool
) -> tuple[list[Pair], str]:
    """The pairs an argument names and the file they are in (see the module docstring).

    Args:
        split: ``test`` for ``--pairs``, ``val`` for ``--val-pairs``: the run's pairs ``RUN_PAIRS`` names.
    """
    cfg = trained.config
    if argument == RUN_PAIRS:
        drawn = run_pairs(cfg, split, run_dir_of(trained.checkpoint), write=write)
        return drawn.pairs, str(drawn.path)
    path = Path(argument)
    if path.suffix.lower() == ".json":
        out_csv = out_dir / f"{path.stem}_pairs.csv"
        pairs = pairs_from_mapping(path, pair_settings(cfg), out_csv, write=write)
        missing = [p for p in distinct_images(pairs) if not (Path(cfg.data.root) / p).is_file()]
        if missing:
            raise UsageError(
                f"{path}: {len(missing)} image(s) not found under data.root {cfg.data.root}, e.g. "
                f"{missing[:3]}"
            )
        return pairs, str(out_csv)
    if path.suffix.lower() != ".csv":
        raise UsageError(
            f"{argument}: expected a pair list (.csv: path_a,path_b,same) or an identity mapping (.json)"
        )
    return read_pairs(path, root=cfg.data.root), str(path)


def _score(
    trained: TrainedModel, pairs: list[Pair], source: str, dist: DistInfo, show_progress: bool, tta: str
) -> PairScores:
    cfg = trained.config
    images = PairImages(distinct_images(pairs), cfg.data.root, pair_transform(cfg))
    loader = build_eval_loader(cfg, images, trained.device, dist)
    _logger.info("scoring %d pairs of %s (%d distinct images)", len(pairs), source, len(images))
    return score_pairs(
        trained.model, pairs, loader, trained.device, trained.modes, trained.amp_dtype, source, show_progress,
        tta,
    )  # fmt: skip


def _dataset_version(trained: TrainedModel) -> str:
    """The dataset version the checkpoint's run recorded (e.g. MSMT17_V2): pairs are read by path,
    without loading the dataset's splits that would tell it."""
    training = trained.origin.get("provenance") or {}
    return training.get("dataset", {}).get("version") or ""


@dataclass
class PairReport:
    evaluation: PairEvaluation
    results: dict[str, Any]  # the --json document
    out_dir: Path
    files: list[Path]


@torch.no_grad()
def evaluate_pairs_trained(
    trained: TrainedModel,
    dist: DistInfo,
    out_dir: Path,
    pairs: str = RUN_PAIRS,
    val_pairs: str | None = None,
    show_progress: bool = False,
    tta: str = "none",
) -> PairReport:
    """Score and measure a pair list with a checkpoint; write roc.png, scores.png, verification.json.

    Args:
        pairs: the pairs to measure (see ``load_pair_argument``).
        val_pairs: validation pairs to choose the thresholds on; None: the checkpoint's stored ones.
        tta: ``flip``: score flip-averaged embeddings (a run with ``eval.tta: flip`` chose its stored
            thresholds on those).
    """
    write, progress = dist.is_main, show_progress and dist.is_main
    test_pairs, test_source = load_pair_argument(pairs, trained, "test", out_dir, write)
    far_targets = trained.config.verification.far_targets
    if val_pairs is not None:
        chosen_pairs, val_source = load_pair_argument(val_pairs, trained, "val", out_dir, write)
        if {p.key for p in chosen_pairs} & {p.key for p in test_pairs}:
            raise UsageError(
                f"{val_source} and {test_source} share pairs: the threshold must be chosen on other pairs"
            )
        val = _score(trained, chosen_pairs, val_source, dist, progress, tta)
        test = _score(trained, test_pairs, test_source, dist, progress, tta)
        evaluation = evaluate_pairs(
            test, val=val, far_targets=far_targets, out_dir=out_dir if write else None
        )
    else:
        test = _score(trained, test_pairs, test_source, dist, progress, tta)
        thresholds, source = stored_verification(trained)
        if not thresholds:
            source += "; pass --val-pairs VAL.csv to choose one"
        evaluation = evaluate_pairs(
            test, thresholds=thresholds, threshold_source=source, far_targets=far_targets,
            out_dir=out_dir if write else None,
        )  # fmt: skip
    results: dict[str, Any] = {
        "checkpoint": str(trained.checkpoint),
        "task": "verification",
        "pairs": test_source,
        "num_pairs": evaluation.num_pairs,
        "val_pairs": None if val_pairs is None else val_source,
        "threshold_source": evaluation.threshold_source,
        "score": "cosine similarity of the embeddings; score >= threshold means same",
    }
    results.update(evaluation.as_json())
    protocol = f"pair verification: {results['score']}; threshold {evaluation.threshold_source}"
    results["provenance"] = evaluation_provenance(
        trained,
        protocol=protocol,
        tta=tta,
        dataset_version=_dataset_version(trained),
        world_size=dist.world_size,
    )
    files = list(evaluation.files)
    if write:
        files.append(write_json(results, out_dir / "verification.json"))
    return PairReport(evaluation, results, out_dir, files)


def format_pair_report(report: PairReport) -> str:
    """What evaluate.py prints for pairs: the counts, the metrics table, the threshold rule, the files."""
    r, first = report.results, next(iter(report.evaluation.results.values()))
    lines = [
        f"{r['checkpoint']}  pairs {r['pairs']}: {first.num_positives} same-identity, "
        f"{first.num_negatives} different-identity (cosine similarity)",
        *format_provenance(r["provenance"]),
        *format_pair_table(report.evaluation),
        f"wrote {', '.join(p.name for p in report.files)} to {report.out_dir}",
    ]
    return "\n".join(lines)
