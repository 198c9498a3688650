"""Starting a new run from another DCAL checkpoint's weights (``model.init_from``): fine-tuning.

Not a resume: only the model's weights are taken (no optimizer, loss weights, epoch or LR
schedule). The backbone and GLCA must match the new model exactly, key for key and shape for
shape; the class-dependent head weights are dropped when the class count differs and left at
their fresh initialisation. As MAE does after a non-strict load, the missing keys are then
checked to be exactly those heads, and both lists are logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError, load_checkpoint

_logger = logging.getLogger(__name__)

# The classifier heads: the backbone's (SA, PWCA), the distillation head of a distilled DeiT, and
# GLCA's copies of both. A BNNeck head (Re-ID) keeps its norm (``<head>.neck.*``, one entry per
# feature channel, independent of the classes); only its ``classifier`` depends on the classes.
HEAD_PREFIXES = ("backbone.head.", "backbone.head_dist.", "glca_head.", "glca_head_dist.")
# The config keys that shape the architecture, named when a checkpoint does not fit.
ARCHITECTURE_KEYS = (
    ("model", "backbone"),
    ("model", "backbone_kwargs"),
    ("model", "glca"),
    ("model", "glca_readout"),
    ("data", "img_size"),
    ("reid", "bnneck"),
)
SHOWN = 8  # keys listed in an error message


class ArchitectureMismatchError(CheckpointError):
    """The checkpoint's backbone or GLCA weights do not fit the model of this config."""


def is_class_key(key: str) -> bool:
    """Whether state-dict entry ``key`` is a weight whose shape depends on the number of classes."""
    return key.startswith(HEAD_PREFIXES) and ".neck." not in key


@dataclass
class InitReport:
    """What ``init_from_checkpoint`` loaded.

    Args:
        path: the checkpoint.
        loaded: state-dict entries copied into the model.
        dropped: the checkpoint's head entries not used (another class count), sorted.
        missing: the model's entries left at their initialisation, sorted (exactly its heads when
            ``dropped``, else none).
        unexpected: checkpoint entries the model has no place for (always empty: refused before).
        classes: (the checkpoint's class count, this run's).
    """

    path: Path
    loaded: int
    dropped: list[str]
    missing: list[str]
    unexpected: list[str]
    classes: tuple[int, int]

    def summary(self) -> str:
        then, now = self.classes
        heads = (
            f"heads dropped ({then} classes in the checkpoint, {now} here)"
            if self.dropped
            else f"heads loaded too ({now} classes)"
        )
        return (
            f"model.init_from {self.path}: {self.loaded} tensors loaded, {heads}; missing keys (freshly "
            f"initialised): {self.missing or 'none'}; unexpected keys: {self.unexpected or 'none'}; dropped "
            f"from the checkpoint: {self.dropped or 'none'}. Not a resume: optimizer, loss weights, epoch "
            "and LR schedule start afresh"
        )


def _listed(keys: Sequence[str]) -> str:
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def _architecture_diff(saved: dict[str, Any], current: dict[str, Any]) -> str:
    changed = []
    for section, key in ARCHITECTURE_KEYS:
        then, now = saved.get(section, {}).get(key), current.get(section, {}).get(key)
        if then != now:
            changed.append(f"{section}.{key}: checkpoint {then!r}, this run {now!r}")
    return "; ".join(changed) if changed else "no architecture key of the config differs"


def init_from_checkpoint(
    model: nn.Module,
    path: str | Path,
    classes: Sequence[str],
    config: dict[str, Any] | None = None,
) -> InitReport:
    """Copy a training checkpoint's model weights into ``model`` (a freshly built ``DualViT``).

    Args:
        model: the new run's model.
        path: a ``last.pt`` / ``best.pt`` / ``epoch_<N>.pt`` written by train.py.
        classes: the new run's class names (index = label); the heads are kept when the checkpoint
            has as many classes (with a warning when the names differ), else dropped.
        config: the new run's resolved config (``cfg.to_dict()``), only to name the architecture
            keys that differ when the weights do not fit.

    Raises:
        ArchitectureMismatchError: an entry outside the heads is missing, unexpected or of another
            shape (the model differs: backbone, depth, width, image size, GLCA, BNNeck), or the heads
            do not fit although the class count is the same.
    """
    path = Path(path)
    state = load_checkpoint(path)
    if "classes" not in state or "config" not in state:
        raise CheckpointError(f"model.init_from: {path} is not a training checkpoint (no classes or config)")
    source: dict[str, torch.Tensor] = state["model"]
    target = model.state_dict()
    then, now = len(state["classes"]), len(classes)
    new_classes = then != now
    dropped = sorted(k for k in source if new_classes and is_class_key(k))
    kept = {k: v for k, v in source.items() if k not in set(dropped)}
    expected_missing = sorted(k for k in target if new_classes and is_class_key(k))
    missing = sorted(set(target) - set(kept))
    unexpected = sorted(set(kept) - set(target))
    shapes = sorted(
        f"{k} {tuple(kept[k].shape)} vs {tuple(target[k].shape)}"
        for k in set(kept) & set(target)
        if kept[k].shape != target[k].shape
    )
    if missing != expected_missing or unexpected or shapes:
        problems = [
            f"{label}: {_listed(keys)}"
            for label, keys in (
                ("missing from the checkpoint", [k for k in missing if k not in expected_missing]),
                ("not in this model", unexpected),
                ("shape checkpoint vs this model", shapes),
            )
            if keys
        ]
        raise ArchitectureMismatchError(
            f"model.init_from: the weights in {path} do not fit this run's model ({'; '.join(problems)}). "
            f"Only the heads may differ (by class count); the architecture must be the checkpoint's "
            f"({_architecture_diff(state['config'], config or {})})."
        )
    result = model.load_state_dict(kept, strict=False)
    if sorted(result.missing_keys) != expected_missing or result.unexpected_keys:
        raise CheckpointError(
            f"model.init_from {path}: load_state_dict reports missing {result.missing_keys} and unexpected "
            f"{result.unexpected_keys}, expected missing exactly {expected_missing}"
        )
    if not new_classes and list(state["classes"]) != list(classes):
        _logger.warning(
            "model.init_from %s: same class count (%d) but other class names; the heads are kept, so "
            "label i starts as the checkpoint's class i", path, now,
        )  # fmt: skip
    return InitReport(
        path=path,
        loaded=len(kept),
        dropped=dropped,
        missing=sorted(result.missing_keys),
        unexpected=sorted(result.unexpected_keys),
        classes=(then, now),
    )
