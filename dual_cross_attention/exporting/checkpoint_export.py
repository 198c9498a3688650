"""Export a training checkpoint: build the inference graph, write it, check parity, write the sidecar.

Everything runs on the CPU in float32, whatever the checkpoint was trained with: the exported
graph is float32, and so is the parity reference. An artefact that fails the parity check is
removed, so a file at ``out`` has always passed it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..builders import normalization
from ..config import image_hw
from ..errors import UsageError
from ..inference import check_mode
from ..prediction import TrainedModel, load_trained
from .formats import FORMATS, ExportError, load_artifact, save_artifact
from .graph import GRAPH_ROLLOUT_PATH, InferenceGraph, reference_outputs, reference_rollout_path
from .parity import ParityReport, check_parity, example_images, parity_images
from .sidecar import describe, write_sidecar

_logger = logging.getLogger(__name__)

PARITY_REFERENCE = (
    "DualViT.forward in PyTorch, float32, on this machine's CPU, normalised outside the model (torchvision)"
)
PARITY_IMAGES = "3 generated images (seed 0): 2 of uniform noise in [0, 1], 1 smooth gradient under a sine"


@dataclass
class ExportResult:
    artifact: Path
    sidecar: Path
    parity: ParityReport
    description: dict[str, Any]


def sidecar_path(out: Path) -> Path:
    """``model.onnx`` -> ``model.json``, next to it."""
    return out.with_suffix(".json")


def remove_stale_sidecar(sidecar: Path, out: Path) -> None:
    """A sidecar left from an earlier export must not describe the new artefact; say so when it
    described another file (model.onnx and model.pt2 share model.json)."""
    if not sidecar.exists():
        return
    try:
        described = json.loads(sidecar.read_text()).get("artifact", {}).get("file")
    except (json.JSONDecodeError, AttributeError):
        described = None
    if described not in (None, out.name):
        _logger.warning(
            "replacing %s, which described %s; give each format its own --out stem", sidecar, described
        )
    sidecar.unlink()


def default_mode(trained: TrainedModel) -> str:
    """predict.py's default, ``sa+glca``, where the model has GLCA; else ``sa``."""
    return "sa+glca" if "sa+glca" in trained.modes else "sa"


def check_deterministic(trained: TrainedModel) -> None:
    """Refuse a model whose output depends on a random draw in every forward (``glca_select:
    random`` with a readout or keys/values the selection reaches): no parity check can pass."""
    m = trained.model
    if m.use_glca and m.glca_select == "random" and (m.glca_readout != "cls" or m.glca_kv != "global"):
        raise UsageError(
            f"{trained.checkpoint} picks GLCA's local patches at random in every forward (model.glca_select: "
            "random), so its outputs are not deterministic and cannot be exported with a parity check"
        )


def export_checkpoint(
    checkpoint: str | Path, fmt: str, out: str | Path, mode: str | None = None, embedding: bool | None = None
) -> ExportResult:
    """Export ``checkpoint``'s inference model to ``out`` in ``fmt`` and write the sidecar next to it.

    Args:
        checkpoint: last.pt or best.pt written by train.py.
        fmt: ``onnx``, ``torchscript`` or ``exported`` (torch.export, .pt2).
        out: the artefact's path; the sidecar is the same path with ``.json``.
        mode: ``sa``, ``glca`` or ``sa+glca``; default ``sa+glca`` where the model has GLCA.
        embedding: output the retrieval embedding instead of class probabilities; default: for
            Re-ID checkpoints.

    Raises:
        ParityError: the artefact's outputs differ from PyTorch's (it is removed).
    """
    if fmt not in FORMATS:
        raise UsageError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    out = Path(out)
    if out.suffix == ".json":
        raise UsageError(f"--out {out}: .json is the sidecar's suffix; name the model e.g. model.onnx")
    if fmt == "exported" and out.suffix != ".pt2":
        raise UsageError(f"--out {out}: torch.export.save writes .pt2 archives; name it e.g. model.pt2")
    trained = load_trained(checkpoint, ["train.device=cpu"])
    cfg, model = trained.config, trained.model
    mode = mode or default_mode(trained)
    check_mode(mode, trained.modes)
    check_deterministic(trained)
    embedding = cfg.task == "reid" if embedding is None else embedding
    mean, std = normalization(cfg)
    height, width = image_hw(cfg.data.img_size)
    images = parity_images(height, width)
    reference_path = reference_rollout_path(model, images)
    _logger.info(
        "exporting %s (%s, mode %s) as %s to %s; rollout: %s in the graph, %s in the PyTorch reference",
        trained.checkpoint, "embedding" if embedding else "probabilities", mode, fmt, out,
        GRAPH_ROLLOUT_PATH if model.use_glca else "none", reference_path,
    )  # fmt: skip
    graph = InferenceGraph(model, mean, std, mode, embedding)
    sidecar = sidecar_path(out)
    remove_stale_sidecar(sidecar, out)
    start = time.perf_counter()
    details = save_artifact(
        graph, fmt, out, example_images(height, width), "embedding" if embedding else "probabilities"
    )
    _logger.info("wrote %s in %.1f s; checking parity", out, time.perf_counter() - start)
    try:
        report = check_parity(
            lambda x: reference_outputs(model, mean, std, mode, embedding, x),
            load_artifact(fmt, out),
            images,
            top1=not embedding,
            name=str(out),
        )
    except ExportError:
        out.unlink(missing_ok=True)
        _logger.error("removed %s: it is not the model", out)
        raise
    with torch.no_grad():
        output_dim = graph(images[:1]).shape[1]
    parity = {**report.to_dict(), "images": PARITY_IMAGES, "reference": PARITY_REFERENCE}
    description = describe(
        cfg=cfg, model=model, classes=trained.classes, mode=mode, embedding=embedding, mean=mean, std=std,
        output_dim=output_dim, artifact=out, fmt=fmt, format_details=details, parity=parity,
        checkpoint=trained.checkpoint, reference_rollout=reference_path,
    )  # fmt: skip
    write_sidecar(description, sidecar)
    return ExportResult(out, sidecar, report, description)
