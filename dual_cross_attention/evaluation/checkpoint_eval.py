"""Evaluate a training checkpoint on a split of its dataset, the way the paper reports it.

The model and the data are rebuilt from the checkpoint's config; every image of the split is
counted exactly once (also under torchrun, where each process takes its own shard), and the
tables, pictures and throughput figures are written next to the checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import engine  # a module import: engine imports evaluation.metrics
from ..builders import build_eval_loader, build_eval_split
from ..data import ImageDataset
from ..distributed import init_distributed
from ..errors import UsageError
from ..inference import TTA_CHOICES
from ..prediction import load_trained
from ..provenance import evaluation_provenance, fgvc_protocol, format_provenance
from ..visualize import draw_attention_grid
from .metrics import Summary, require_each_image_once, summarize
from .reid_checkpoint import ReIDReport, evaluate_reid_trained, format_reid_report
from .report import attention_examples, results_json, write_tables
from .throughput import Throughput, measure_throughput

if TYPE_CHECKING:
    from ..verification.checkpoint_pairs import PairReport

_logger = logging.getLogger(__name__)


class ClassMismatchError(UsageError):
    """The dataset's classes are not the ones the checkpoint was trained on."""


def check_classes(expected: Sequence[str], dataset: ImageDataset, checkpoint: Path, root: str) -> None:
    """Refuse a dataset whose class list (names and order, which fix the labels) differs."""
    actual = list(dataset.classes)
    if actual == list(expected):
        return
    # Shorter list's length when one list is a prefix of the other.
    pairs = zip(expected, actual, strict=False)
    first = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(expected), len(actual)))

    def name(names: Sequence[str]) -> str:
        return repr(names[first]) if first < len(names) else "(none)"

    raise ClassMismatchError(
        f"{dataset.description} at {root} does not have the classes {checkpoint} was trained on: the "
        f"checkpoint has {len(expected)} classes, the dataset {len(actual)}; they first differ at label "
        f"{first}: checkpoint {name(expected)}, dataset {name(actual)}. Point --set data.dataset=... "
        "data.root=... at the dataset the checkpoint was trained on."
    )


@dataclass
class EvaluationReport:
    summary: Summary
    results: dict[str, Any]  # the --json document
    out_dir: Path
    files: list[Path]
    throughput: Throughput | None
    tta: str


def default_out_dir(checkpoint: Path, split: str, tta: str) -> Path:
    """A folder next to the checkpoint, named after it, the split and the TTA, so evaluating
    best.pt and last.pt, or test and val, never overwrite each other."""
    suffix = "" if tta == "none" else f"_tta-{tta}"
    return checkpoint.parent / f"{checkpoint.stem}_{split}{suffix}"


def _check_options(visualize: int, tta: str | None, throughput_iterations: int) -> None:
    if visualize < 0 or throughput_iterations < 0:
        raise UsageError(
            f"--visualize and --throughput-iters must be >= 0, got {visualize}, {throughput_iterations}"
        )
    if tta is not None and tta not in TTA_CHOICES:
        raise UsageError(f"--tta must be one of {TTA_CHOICES}, got '{tta}'")


def evaluate_checkpoint(
    checkpoint: str | Path,
    split: str = "test",
    overrides: Sequence[str] = (),
    out_dir: str | Path | None = None,
    visualize: int = 0,
    tta: str | None = None,
    throughput_iterations: int = 5,
    show_progress: bool = False,
    rerank: bool = False,
    save_features: str | Path | None = None,
    pairs: str | None = None,
    val_pairs: str | None = None,
) -> EvaluationReport | ReIDReport | PairReport:
    """Evaluate a training checkpoint on a split of its dataset and write the tables and pictures.

    Args:
        checkpoint: a ``last.pt`` / ``best.pt`` written by train.py.
        split: 'test', 'val' (the carve-out when data.val_fraction > 0, or the dataset's own) or 'train'.
        overrides: ``section.key=value`` changes to the stored config (e.g. ``data.root=...``).
        out_dir: where to write; default ``default_out_dir``.
        visualize: number of images in attention_grid.png (0: no picture).
        tta: 'none' or 'flip': FGVC probabilities, Re-ID (and pair) embeddings averaged over the
            image and its mirror (``inference.flip_averaged``); None: the checkpoint's ``eval.tta``.
        throughput_iterations: timed batches per forward kind (0: skip the measurement).
        show_progress: progress bar over the split.
        rerank: Re-ID only: k-reciprocal re-ranking.
        save_features: Re-ID only: write the query/gallery features ranked to this .npz file.
        pairs: verify pairs instead (``verification.checkpoint_pairs``): a pair CSV, an identity JSON,
            or ``RUN_PAIRS`` (the run's generated test pairs).
        val_pairs: with ``pairs``: validation pairs the thresholds are chosen on (default: the
            thresholds stored in the checkpoint).

    A Re-ID checkpoint (its config names a Re-ID dataset) is ranked query against gallery instead
    (``reid_checkpoint``); ``split`` does not apply to it.
    """
    _check_options(visualize, tta, throughput_iterations)
    if pairs is None and val_pairs is not None:
        raise UsageError("--val-pairs chooses the thresholds for --pairs: give --pairs too")
    if pairs is not None and (split != "test" or rerank or save_features or visualize):
        raise UsageError(
            "--pairs verifies pairs: --split, --rerank, --save-features and --visualize do not apply"
        )
    dist = init_distributed(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    trained = load_trained(checkpoint, overrides)
    tta = trained.config.eval.tta if tta is None else tta
    if pairs is not None:
        # Imported here: verification imports evaluation (reid, report), whose package imports this module.
        from ..verification import checkpoint_pairs

        name = "pairs" if pairs == checkpoint_pairs.RUN_PAIRS else f"pairs_{Path(pairs).stem}"
        target = Path(out_dir) if out_dir is not None else default_out_dir(trained.checkpoint, name, tta)
        return checkpoint_pairs.evaluate_pairs_trained(
            trained, dist, target, pairs, val_pairs, show_progress, tta
        )
    if trained.config.task == "reid":
        if split != "test":
            raise UsageError(
                "a Re-ID checkpoint is evaluated query against gallery of the test set: --split does not "
                "apply to it"
            )
        target = (
            Path(out_dir)
            if out_dir is not None
            else default_out_dir(trained.checkpoint, "reid_rerank" if rerank else "reid", tta)
        )
        return evaluate_reid_trained(
            trained, dist, target, rerank, save_features, show_progress, visualize, tta
        )
    if rerank or save_features is not None:
        raise UsageError("--rerank and --save-features are for Re-ID checkpoints; this one is FGVC")
    if visualize and not trained.model.use_glca:
        raise UsageError("--visualize needs the GLCA branch (rollout); this model has model.glca: false")
    dataset = build_eval_split(trained.config, split)
    check_classes(trained.classes, dataset, trained.checkpoint, trained.config.data.root)
    if len(dataset) == 0:
        raise UsageError(f"{dataset.description} at {trained.config.data.root} holds no images")
    loader = build_eval_loader(trained.config, dataset, trained.device, dist)
    _logger.info("evaluating %s on %s (%d images, %s, TTA %s)", trained.checkpoint, dataset.description,
                 len(dataset), trained.device, tta)  # fmt: skip
    progress = show_progress and dist.is_main
    tally = engine.evaluate(
        trained.model, loader, trained.device, len(trained.classes), trained.modes, trained.amp_dtype, tta,
        progress,
    )  # fmt: skip
    require_each_image_once(tally.num_images, len(dataset), dataset.description)
    summary = summarize(tally, trained.classes)
    target = Path(out_dir) if out_dir is not None else default_out_dir(trained.checkpoint, split, tta)
    record = evaluation_provenance(
        trained, protocol=fgvc_protocol(split), tta=tta, world_size=dist.world_size
    )
    results = results_json(summary, trained.checkpoint, split, record)
    files, speed = [], None
    if dist.is_main:  # rank 0 writes the files and times the model
        files = write_tables(summary, trained.classes, target)
        if visualize:
            examples = attention_examples(trained, dataset, visualize, tta)
            files.append(draw_attention_grid(examples, target / "attention_grid.png"))
        if throughput_iterations:
            speed = measure_throughput(trained, next(iter(loader))[0], throughput_iterations)
    return EvaluationReport(summary, results, out_dir=target, files=files, throughput=speed, tta=tta)


def format_report(report: EvaluationReport | ReIDReport | PairReport) -> str:
    """The table the script prints: metrics per mode, throughput, files written."""
    if isinstance(report, ReIDReport):
        return format_reid_report(report)
    if not isinstance(report, EvaluationReport):  # a PairReport (see evaluate_checkpoint's import)
        from ..verification.checkpoint_pairs import format_pair_report

        return format_pair_report(report)
    r = report.results
    lines = [
        f"{r['checkpoint']}  split {r['split']}: {r['num_images']} images, TTA {report.tta}",
        *format_provenance(r["provenance"]),
        f"{'mode':<8} {'top-1':>7} {'top-5':>7} {'mean-class':>11}",
    ]
    for mode, m in report.summary.metrics.items():
        lines.append(f"{mode:<8} {m['top1']:7.2f} {m['top5']:7.2f} {m['mean_class']:11.2f}")
    speed = report.throughput
    if speed is not None:
        text = (
            f"throughput (batch {speed.batch_size}, {speed.device}, no TTA): SA only {speed.sa:.1f} images/s"
        )
        if speed.sa_glca is not None:
            text += f", SA+GLCA {speed.sa_glca:.1f} images/s ({speed.sa_glca / speed.sa:.2f}x)"
        lines.append(text)
    lines.append(f"wrote {', '.join(p.name for p in report.files)} to {report.out_dir}")
    return "\n".join(lines)
