"""Running a trained checkpoint on images: rebuild the model from its checkpoint, top-k on files.

The model is rebuilt from the config stored in the checkpoint, so a checkpoint is all a user
needs; ``--set`` style overrides change what may differ on another machine (data root,
device, batch size). Pretrained backbone weights are never loaded here: the checkpoint holds
every weight, and the pretrained file may not exist where the model is used.

Evaluation (``evaluation/``) scores the same probabilities (``inference.class_probabilities``)
on a labelled split; this module is also what ``predict.py`` uses on unlabelled files, where an
unreadable file is reported and skipped so that one bad image never loses the rest of the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .builders import build_eval_pipeline, build_model
from .checkpoint import CheckpointError, load_checkpoint
from .config import Config, apply_overrides, from_dict, parse_override
from .data import CorruptImageError, ImagePipeline, load_rgb
from .errors import UsageError
from .inference import as_distribution, available_modes, check_mode, class_probabilities
from .models.dual_vit import DualViT
from .runtime import inference_precision, resolve_device

_logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass
class TrainedModel:
    """A checkpoint's model in eval mode, with what is needed to feed it and name its outputs."""

    model: DualViT
    config: Config  # the checkpoint's config with the overrides applied
    classes: list[str]  # class names; index = label
    device: torch.device
    amp_dtype: torch.dtype
    checkpoint: Path
    verification: dict[str, Any] = field(default_factory=dict)  # the checkpoint's, e.g. thresholds
    overrides: tuple[str, ...] = ()  # the --set overrides applied to the checkpoint's config
    # What the checkpoint says about its training: eval_split, epoch, selected (whether the epoch
    # is the one best.pt's rule chose) and the run's provenance record (absent in older ones).
    origin: dict[str, Any] = field(default_factory=dict)

    @property
    def modes(self) -> tuple[str, ...]:
        """Inference modes this model can run: all three with GLCA, else only ``sa``."""
        return available_modes(self.model)


# What may differ where a checkpoint is used; any other key would change what is measured.
MAY_OVERRIDE = ("data.root", "data.num_workers", "data.eval_batch_size", "train.device")


def checkpoint_config(state: dict[str, Any], path: Path, overrides: Sequence[str] = ()) -> Config:
    """The config stored in a checkpoint, with ``overrides`` applied and validated; an error
    names the ``--set`` that caused it rather than the checkpoint. Only ``MAY_OVERRIDE`` keys
    may be overridden."""
    if "config" not in state or "classes" not in state:
        raise CheckpointError(
            f"{path} has no stored config or class list; only checkpoints written by train.py can be "
            "evaluated (last.pt or best.pt of a run)"
        )
    cfg = apply_overrides(from_dict(state["config"], source=f"config stored in {path}"), overrides)
    for text in overrides:
        key = parse_override(text)[0]
        if key not in MAY_OVERRIDE:
            raise UsageError(
                f"--set {text}: {key} is fixed by the checkpoint (changing it would change what is "
                f"measured); the keys that may differ where a checkpoint is used: {list(MAY_OVERRIDE)}"
            )
    return cfg


def restore_model(state: dict[str, Any], cfg: Config, num_classes: int, path: Path) -> DualViT:
    """Build the architecture of ``cfg`` and load the checkpoint's weights strictly, in eval mode."""
    # Every weight comes from the checkpoint; loading pretrained weights first would be wasted
    # work and would fail where the pretrained file or the network is missing.
    arch = replace(cfg, model=replace(cfg.model, pretrained=False, pretrained_path=None))
    model = build_model(arch, num_classes)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(
            f"the weights in {path} do not fit the model built from its config: {err}. If you passed "
            "--set overrides of model.* or data.img_size, drop them: they change the architecture."
        ) from err
    return model.eval()


def load_trained(checkpoint: str | Path, overrides: Sequence[str] = ()) -> TrainedModel:
    """Read a training checkpoint and rebuild its model on the configured device (``train.device``)."""
    path = Path(checkpoint)
    state = load_checkpoint(path)
    cfg = checkpoint_config(state, path, overrides)
    if overrides:
        _logger.info("config overrides on top of %s: %s", path, " ".join(overrides))
    device = resolve_device(cfg.train.device)
    classes = list(state["classes"])
    model = restore_model(state, cfg, len(classes), path).to(device)
    return TrainedModel(
        model=model,
        config=cfg,
        classes=classes,
        device=device,
        amp_dtype=inference_precision(cfg.train.precision, device),
        checkpoint=path,
        verification=dict(state.get("verification", {})),
        overrides=tuple(overrides),
        origin={key: state.get(key) for key in ("eval_split", "epoch", "selected", "provenance")},
    )


@dataclass(frozen=True)
class Skipped:
    """An input that was not predicted, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image."""

    path: Path
    classes: list[str]  # top-k class names, most probable first
    probabilities: list[float]  # their probabilities (each mode's output normalised to sum to 1)


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def find_images(inputs: Sequence[str | Path]) -> tuple[list[Path], list[Skipped]]:
    """Image files named in ``inputs``, recursing into folders; and the inputs that are not images.

    Folders contribute their .jpg/.jpeg/.png/.webp files (any case), sorted; a path given twice
    is predicted once.
    """
    found: list[Path] = []
    skipped: list[Skipped] = []
    kinds = "/".join(IMAGE_SUFFIXES)
    for item in map(Path, inputs):
        if item.is_dir():
            images = _images_under(item)
            if not images:
                skipped.append(Skipped(item, f"folder holds no {kinds} files"))
            found += images
        elif item.is_file() and item.suffix.lower() in IMAGE_SUFFIXES:
            found.append(item)
        elif item.is_file():
            skipped.append(Skipped(item, f"not a {kinds} file"))
        else:
            skipped.append(Skipped(item, "no such file or folder"))
    return list(dict.fromkeys(found)), skipped


def _batches(paths: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(paths), size):
        yield paths[start : start + size]


def _decode(
    paths: Sequence[Path], transform: ImagePipeline
) -> tuple[list[torch.Tensor], list[Path], list[Skipped]]:
    """Transformed tensors of the readable files among ``paths``; the others as Skipped."""
    tensors, kept, skipped = [], [], []
    for path in paths:
        try:
            tensors.append(transform(load_rgb(path)))
        except (CorruptImageError, OSError) as err:  # undecodable, vanished or unreadable file
            _logger.warning("skipping %s: %s", path, err)
            skipped.append(Skipped(path, str(err)))
            continue
        kept.append(path)
    return tensors, kept, skipped


def predict_files(
    trained: TrainedModel,
    paths: Sequence[Path],
    mode: str = "sa+glca",
    top_k: int = 5,
    batch_size: int = 32,
    tta: str | None = None,
) -> tuple[list[Prediction], list[Skipped]]:
    """Top-k classes of each readable image in ``paths``; unreadable files are skipped and returned.

    Args:
        trained: from ``load_trained``.
        paths: image files (see ``find_images``).
        mode: ``sa``, ``glca`` or ``sa+glca``.
        top_k: classes reported per image; capped at the number of classes (with a warning).
        batch_size: images per forward pass.
        tta: ``none`` or ``flip`` (see ``class_probabilities``); None: the checkpoint's ``eval.tta``.
    """
    check_mode(mode, trained.modes)
    if top_k < 1 or batch_size < 1:
        raise UsageError(f"top_k and batch_size must be >= 1, got {top_k} and {batch_size}")
    if top_k > len(trained.classes):
        _logger.warning("top-k %d > %d classes: reporting all classes", top_k, len(trained.classes))
        top_k = len(trained.classes)
    transform = build_eval_pipeline(trained.config)
    tta = trained.config.eval.tta if tta is None else tta
    predictions: list[Prediction] = []
    skipped: list[Skipped] = []
    for chunk in _batches(paths, batch_size):
        tensors, kept, bad = _decode(chunk, transform)
        skipped += bad
        if not kept:
            continue
        images = torch.stack(tensors).to(trained.device)
        probs, _ = class_probabilities(trained.model, images, (mode,), tta, trained.amp_dtype)
        values, indices = as_distribution(probs[mode], mode).topk(top_k, dim=1)  # (B, k)
        for path, p, i in zip(kept, values.tolist(), indices.tolist(), strict=True):
            predictions.append(Prediction(path, [trained.classes[c] for c in i], p))
    return predictions, skipped


def predictions_frame(predictions: Sequence[Prediction]) -> pd.DataFrame:
    """One row per image: path, class_1, prob_1, ..., class_k, prob_k."""
    rows = []
    for p in predictions:
        row: dict[str, Any] = {"path": str(p.path)}
        for rank, (name, prob) in enumerate(zip(p.classes, p.probabilities, strict=True), start=1):
            row[f"class_{rank}"] = name
            row[f"prob_{rank}"] = prob
        rows.append(row)
    return pd.DataFrame(rows)


def format_predictions(predictions: Sequence[Prediction], skipped: Sequence[Skipped]) -> str:
    """A plain-text report: one line per image, then the skipped inputs with the reason."""
    lines = []
    for p in predictions:
        ranked = "  ".join(
            f"{name} {prob:.3f}" for name, prob in zip(p.classes, p.probabilities, strict=True)
        )
        lines.append(f"{p.path}  {ranked}")
    if skipped:
        lines.append(f"skipped {len(skipped)} input(s):")
        lines += [f"  {s.path}: {s.reason}" for s in skipped]
    return "\n".join(lines)
