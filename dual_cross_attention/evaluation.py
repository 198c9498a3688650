"""Evaluating a checkpoint the way the paper reports it, with the tables and pictures people ask for.

For each inference mode (``sa``, ``glca``, ``sa+glca``): top-1, top-5 and mean per-class
accuracy (the official FGVC-Aircraft metric: the mean over classes of each class's top-1),
plus per-class accuracies, the most confused class pairs, a confusion matrix picture,
attention pictures and inference throughput.

All counting goes through one ``Tally`` of per-class sums (a confusion matrix and top-5 hits
per class for each mode). Sums from disjoint shards add up, so a multi-process run all-reduces
``Tally.tensors()`` and nothing else; every metric is derived from the tally afterwards, and
``require_each_image_once`` checks that the tally counted exactly the images of the split (a
sampler that pads shards with repeated images would fail it).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .builders import build_eval_split, normalization
from .config import Config
from .data import ImageDataset
from .distributed import DistInfo, ShardSampler, all_reduce_sum, init_distributed
from .models.dual_vit import PREDICT_MODES
from .prediction import TTA_CHOICES, TrainedModel, class_probabilities, load_trained
from .runtime import autocast
from .visualize import AttentionExample, draw_attention_grid, draw_confusion

_logger = logging.getLogger(__name__)

MAX_CONFUSIONS = 20  # rows of confusions.csv
TOP_K = 5


class ClassMismatchError(ValueError):
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


def eval_loader(
    cfg: Config, dataset: ImageDataset, device: torch.device, dist: DistInfo | None = None
) -> DataLoader:
    """In order, no drop_last: each image is seen once (``data.eval_batch_size``, else 2 x batch).

    Under torchrun each process takes every world_size-th image, without padding.
    """
    batch = cfg.data.eval_batch_size or 2 * cfg.train.batch_size
    dist = dist or DistInfo()
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=ShardSampler(len(dataset), dist.rank, dist.world_size),
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
    )


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


@torch.no_grad()
def collect(
    trained: TrainedModel, loader: DataLoader, tta: str = "none", show_progress: bool = False
) -> Tally:
    """One pass over ``loader``: the tally of every mode the model has."""
    model, device = trained.model.eval(), trained.device
    tally = Tally.zeros(len(trained.classes), trained.modes, device)
    for images, labels in tqdm(loader, desc="evaluate", disable=not show_progress, leave=False):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        probs, _ = class_probabilities(model, images, trained.modes, tta, trained.amp_dtype)
        for mode, scores in probs.items():
            tally.add(mode, scores, labels)
    return tally


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


def most_confused(confusion: np.ndarray, classes: Sequence[str], limit: int = MAX_CONFUSIONS) -> pd.DataFrame:
    """The ``limit`` largest off-diagonal cells: true class, predicted class, count, share (%) of
    the true class's images."""
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    true, pred = np.nonzero(off)
    counts = off[true, pred]
    totals = confusion.sum(axis=1)[true]
    order = np.lexsort((pred, true, -counts))[:limit]  # most images first; ties in class order
    return pd.DataFrame(
        {
            "true_class": [classes[i] for i in true[order]],
            "predicted_class": [classes[i] for i in pred[order]],
            "count": counts[order],
            "share": 100.0 * counts[order] / totals[order],
        }
    )


def results_json(summary: Summary, checkpoint: Path, split: str) -> dict[str, Any]:
    """The ``--json`` document; a mode the model lacks (no GLCA) is null."""
    results: dict[str, Any] = {mode: summary.metrics.get(mode) for mode in PREDICT_MODES}
    results.update(num_images=summary.num_images, checkpoint=str(checkpoint.resolve()), split=split)
    return results


def write_json(results: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def write_tables(summary: Summary, classes: Sequence[str], out_dir: Path) -> list[Path]:
    """per_class.csv, confusions.csv and confusion.png (the last two for the primary mode)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mode = summary.primary_mode
    per_class = out_dir / "per_class.csv"
    summary.per_class.to_csv(per_class, index=False)
    confusions = out_dir / "confusions.csv"
    most_confused(summary.confusion[mode], classes).assign(mode=mode).to_csv(confusions, index=False)
    title = f"confusion ({mode}), top-1 {summary.metrics[mode]['top1']:.2f}%"
    picture = draw_confusion(summary.confusion[mode], classes, out_dir / "confusion.png", title)
    return [per_class, confusions, picture]


def spread_indices(length: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(length)`` (all of them if count >= length);
    datasets are stored class by class, so this shows several classes."""
    if count >= length:
        return list(range(length))
    return sorted({int(i) for i in np.linspace(0, length - 1, count).round()})


def to_uint8(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo the normalization: (B, 3, H, W) float -> (B, H, W, 3) uint8 as the model saw them."""
    m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    pixels = ((images.float() * s + m).clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def attention_examples(
    trained: TrainedModel, dataset: ImageDataset, count: int, tta: str = "none"
) -> list[AttentionExample]:
    """``count`` images of ``dataset`` with their rollout, GLCA patches and primary-mode prediction."""
    model = trained.model
    if not model.use_glca:
        raise ValueError(
            "attention pictures need the GLCA branch (rollout); this model has model.glca: false"
        )
    indices = spread_indices(len(dataset), count)
    items = [dataset[i] for i in indices]
    images = torch.stack([image for image, _ in items]).to(trained.device)  # (B, 3, H, W)
    probs, out = class_probabilities(model, images, ("sa+glca",), tta, trained.amp_dtype)
    predicted = probs["sa+glca"].argmax(dim=1).tolist()
    gh, gw = model.backbone.patch_embed.grid_size
    rollout = out.rollout.float().view(len(items), gh, gw).cpu().numpy()  # (B, gh, gw)
    pixels = to_uint8(images, *normalization(trained.config.model.backbone))
    return [
        AttentionExample(
            image=pixels[i],
            rollout=rollout[i],
            selected=out.local_index[i].cpu().numpy(),
            true_name=trained.classes[label],
            predicted_name=trained.classes[predicted[i]],
        )
        for i, (_, label) in enumerate(items)
    ]


@dataclass
class Throughput:
    batch_size: int
    device: str
    sa: float  # images/s of the plain ViT forward (SA only, what deploying without GLCA costs)
    sa_glca: float | None  # images/s of the DCAL inference forward (SA + rollout + GLCA)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def images_per_second(
    forward: Callable[[torch.Tensor], Any], images: torch.Tensor, iterations: int, warmup: int = 1
) -> float:
    """Mean rate of ``forward(images)`` over ``iterations`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        forward(images)
    _synchronize(images.device)
    start = time.perf_counter()
    for _ in range(iterations):
        forward(images)
    _synchronize(images.device)
    return iterations * len(images) / (time.perf_counter() - start)


def measure_throughput(trained: TrainedModel, images: torch.Tensor, iterations: int) -> Throughput:
    """Inference speed on one batch, without TTA: the timm forward (SA only) and DCAL's (SA+GLCA)."""
    model, device, dtype = trained.model.eval(), trained.device, trained.amp_dtype
    images = images.to(device)

    def timed(module: torch.nn.Module) -> float:
        def forward(x: torch.Tensor) -> Any:
            with autocast(device, dtype):
                return module(x)

        return images_per_second(forward, images, iterations)

    # The backbone is the timm ViT whose head SA uses: its forward gives the SA logits alone.
    return Throughput(
        batch_size=len(images),
        device=str(device),
        sa=timed(model.backbone),
        sa_glca=timed(model) if model.use_glca else None,
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


def _check_options(visualize: int, tta: str, throughput_iterations: int) -> None:
    if visualize < 0 or throughput_iterations < 0:
        raise ValueError(
            f"--visualize and --throughput-iters must be >= 0, got {visualize}, {throughput_iterations}"
        )
    if tta not in TTA_CHOICES:
        raise ValueError(f"--tta must be one of {TTA_CHOICES}, got '{tta}'")


def evaluate_checkpoint(
    checkpoint: str | Path,
    split: str = "test",
    overrides: Sequence[str] = (),
    out_dir: str | Path | None = None,
    visualize: int = 0,
    tta: str = "none",
    throughput_iterations: int = 5,
    show_progress: bool = False,
) -> EvaluationReport:
    """Evaluate a training checkpoint on a split of its dataset and write the tables and pictures.

    Args:
        checkpoint: a ``last.pt`` / ``best.pt`` written by train.py.
        split: 'test', 'val' (the carve-out when data.val_fraction > 0, or the dataset's own) or 'train'.
        overrides: ``section.key=value`` changes to the stored config (e.g. ``data.root=...``).
        out_dir: where to write; default ``default_out_dir``.
        visualize: number of images in attention_grid.png (0: no picture).
        tta: 'none' or 'flip' (probabilities averaged with the mirrored image).
        throughput_iterations: timed batches per forward kind (0: skip the measurement).
        show_progress: progress bar over the split.
    """
    _check_options(visualize, tta, throughput_iterations)
    dist = init_distributed(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    trained = load_trained(checkpoint, overrides)
    if visualize and not trained.model.use_glca:
        raise ValueError("--visualize needs the GLCA branch (rollout); this model has model.glca: false")
    dataset = build_eval_split(trained.config, split)
    check_classes(trained.classes, dataset, trained.checkpoint, trained.config.data.root)
    if len(dataset) == 0:
        raise ValueError(f"{dataset.description} at {trained.config.data.root} holds no images")
    loader = eval_loader(trained.config, dataset, trained.device, dist)
    _logger.info("evaluating %s on %s (%d images, %s, TTA %s)", trained.checkpoint, dataset.description,
                 len(dataset), trained.device, tta)  # fmt: skip
    tally = collect(trained, loader, tta, show_progress and dist.is_main)
    for counts in tally.tensors():
        all_reduce_sum(counts)  # each process counted its own shard
    require_each_image_once(tally.num_images, len(dataset), dataset.description)
    summary = summarize(tally, trained.classes)
    target = Path(out_dir) if out_dir is not None else default_out_dir(trained.checkpoint, split, tta)
    results = results_json(summary, trained.checkpoint, split)
    if not dist.is_main:  # rank 0 writes the files and times the model
        return EvaluationReport(
            summary=summary, results=results, out_dir=target, files=[], throughput=None, tta=tta
        )
    files = write_tables(summary, trained.classes, target)
    if visualize:
        examples = attention_examples(trained, dataset, visualize, tta)
        files.append(draw_attention_grid(examples, target / "attention_grid.png"))
    speed = None
    if throughput_iterations:
        speed = measure_throughput(trained, next(iter(loader))[0], throughput_iterations)
    return EvaluationReport(
        summary=summary,
        results=results,
        out_dir=target,
        files=files,
        throughput=speed,
        tta=tta,
    )


def format_report(report: EvaluationReport) -> str:
    """The table the script prints: metrics per mode, throughput, files written."""
    r = report.results
    lines = [
        f"{r['checkpoint']}  split {r['split']}: {r['num_images']} images, TTA {report.tta}",
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
