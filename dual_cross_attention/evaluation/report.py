"""What an evaluation writes and prints: tables, JSON, pictures of attention, the text report."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..builders import normalization
from ..data import ImageDataset
from ..errors import UsageError
from ..inference import class_probabilities
from ..models.dual_vit import PREDICT_MODES
from ..prediction import TrainedModel
from ..visualize import AttentionExample, draw_confusion
from .metrics import Summary

MAX_CONFUSIONS = 20  # rows of confusions.csv


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


def results_json(
    summary: Summary, checkpoint: Path, split: str, provenance: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``--json`` document; a mode the model lacks (no GLCA) is null. ``provenance``: the
    record of ``provenance.evaluation_provenance``, under that key."""
    results: dict[str, Any] = {mode: summary.metrics.get(mode) for mode in PREDICT_MODES}
    results.update(num_images=summary.num_images, checkpoint=str(checkpoint.resolve()), split=split)
    if provenance is not None:
        results["provenance"] = provenance
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
        raise UsageError(
            "attention pictures need the GLCA branch (rollout); this model has model.glca: false"
        )
    indices = spread_indices(len(dataset), count)
    items = [dataset[i] for i in indices]
    images = torch.stack([image for image, _ in items]).to(trained.device)  # (B, 3, H, W)
    probs, out = class_probabilities(model, images, ("sa+glca",), tta, trained.amp_dtype)
    predicted = probs["sa+glca"].argmax(dim=1).tolist()
    gh, gw = model.backbone.patch_embed.grid_size
    rollout = out.rollout.float().view(len(items), gh, gw).cpu().numpy()  # (B, gh, gw)
    pixels = to_uint8(images, *normalization(trained.config))
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
