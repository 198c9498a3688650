"""The sidecar ``<name>.json`` written next to an exported model: everything a user needs to
feed it and read its output, without this package.

Keys (``SCHEMA``): ``artifact`` (file, format, sha256, how to load it), ``task``, ``mode``,
``input`` (name, shape with a dynamic batch, dtype, NCHW, RGB, value range [0, 1]),
``preprocessing`` (what to do before feeding: the evaluation pipeline's resize and crop, in
words and as numbers), ``inside_graph`` (the normalisation with its numbers, eval mode, the
rollout path), ``output`` (class probabilities with the class names in label order, or the
embedding with its dimension and normalisation), ``parity`` (the check run at export),
``source`` (the checkpoint and its sha256) and ``versions``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch

from ..config import Config, image_hw
from ..models.dual_vit import DualViT
from .formats import BATCH_DIM, INPUT_NAME
from .graph import GRAPH_ROLLOUT_PATH

SCHEMA = "dcal-export/1"
RESIZE_HOW = (
    "cv2.resize(rgb_uint8, (width, height), interpolation=cv2.INTER_LINEAR) reproduces it; PIL's "
    "BILINEAR resize antialiases when shrinking and gives slightly different pixels"
)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def preprocessing(cfg: Config) -> dict[str, Any]:
    """What the user does to a decoded image before feeding it: the geometry of the run's
    evaluation pipeline (``build_eval_pipeline`` / ``build_reid_eval_transform``), then /255."""
    height, width = image_hw(cfg.data.img_size)
    decode = "decode the file to 8-bit RGB (grayscale, CMYK, palette: converted; alpha dropped)"
    scale = "convert to float32 and divide by 255, giving values in [0, 1]"
    layout = f"lay out as (N, 3, {height}, {width}): channels first, R, G, B"
    bilinear = "bilinear (cv2.INTER_LINEAR, as albumentations.Resize)"
    if cfg.task == "reid":
        geometry = f"resize the whole image to {height} x {width} (height x width), {bilinear}; no crop"
        resize, crop = {"height": height, "width": width}, None
    else:
        side = cfg.data.resize_size
        top, left = (side - height) // 2, (side - width) // 2
        geometry = (
            f"resize the whole image to a {side} x {side} square, {bilinear}, then take the "
            f"{height} x {width} center crop (rows {top}:{top + height}, columns {left}:{left + width})"
        )
        resize = {"height": side, "width": side}
        crop = {"height": height, "width": width, "top": top, "left": left}
    return {
        "rule": f"{geometry}; {scale}",
        "steps": [decode, geometry, scale, layout],
        "resize": {**resize, "interpolation": "bilinear", "keep_aspect_ratio": False, "how": RESIZE_HOW},
        "center_crop": crop,
        "test_time_augmentation": "none (for flip TTA, average the outputs of the image and its mirror)",
    }


def output_description(
    model: DualViT, cfg: Config, mode: str, embedding: bool, classes: Sequence[str], dim: int
) -> dict[str, Any]:
    """The output tensor: probabilities over ``classes`` in label order, or the embedding."""
    if not embedding:
        rule = {
            "sa": "softmax of the SA logits",
            "glca": "softmax of the GLCA logits",
            "sa+glca": "(softmax(SA logits) + softmax(GLCA logits)) / 2, as predict.py reports it",
        }[mode]
        return {
            "name": "probabilities", "kind": "probabilities", "shape": [BATCH_DIM, len(classes)],
            "rule": rule, "sums_to": 1.0, "classes": list(classes),
        }  # fmt: skip
    feature = "class-token feature after the BNNeck's batch norm" if model.bnneck else "pre-logits feature"
    rule = {
        "sa": f"the SA {feature}",
        "glca": f"the GLCA {feature}",
        "sa+glca": f"[SA / |SA|, GLCA / |GLCA|]: the SA and the GLCA {feature}, each L2-normalised, "
        "concatenated",
    }[mode]
    distance = cfg.reid.distance if cfg.task == "reid" else "cosine"
    return {
        "name": "embedding", "kind": "embedding", "shape": [BATCH_DIM, dim], "dim": dim, "rule": rule,
        "per_mode": "the embedding of this mode only; each mode is a different vector (sa+glca: 2 x width)",
        "l2_normalized": False,
        "norm": "sqrt(2): each half has norm 1" if mode == "sa+glca" else "not normalised",
        "compare_with": f"{distance} distance, as evaluate.py ranks (the run's reid.distance)",
    }  # fmt: skip


def describe(
    *,
    cfg: Config,
    model: DualViT,
    classes: Sequence[str],
    mode: str,
    embedding: bool,
    mean: Sequence[float],
    std: Sequence[float],
    output_dim: int,
    artifact: Path,
    fmt: str,
    format_details: dict[str, Any],
    parity: dict[str, Any],
    checkpoint: Path,
    reference_rollout: str,
) -> dict[str, Any]:
    """The sidecar's content (see the module docstring)."""
    height, width = image_hw(cfg.data.img_size)
    streams = "SA and GLCA" if model.use_glca else "SA"
    rollout = {
        "path": GRAPH_ROLLOUT_PATH if model.use_glca else "none",
        "detail": "explicit attention (softmax materialised), rollout by N x N matrix products, top-R by "
        "topk; the fused log-sum-exp path (private SDPA kernels, batch-dependent tiling) does not export",
        "pytorch_reference_path": reference_rollout,
    }
    if model.use_glca:
        rollout.update(glca_select=model.glca_select, local_tokens=model.num_local_tokens)
    return {
        "schema": SCHEMA,
        "artifact": {"file": artifact.name, "format": fmt, "sha256": sha256(artifact), **format_details},
        "task": cfg.task,
        "mode": mode,
        "input": {
            "name": INPUT_NAME,
            "shape": [BATCH_DIM, 3, height, width],
            "dtype": "float32",
            "layout": "NCHW",
            "channel_order": "RGB",
            "value_range": [0.0, 1.0],
            "height": height,
            "width": width,
            "batch": "dynamic: any batch size >= 1",
        },  # fmt: skip
        "preprocessing": preprocessing(cfg),
        "inside_graph": {
            "normalization": {
                "mean": list(mean),
                "std": list(std),
                "formula": "(x[:, c] - mean[c]) / std[c] for c in R, G, B",
                "note": "do not normalise the input yourself: it is done inside the graph",
            },  # fmt: skip
            "model": f"DCAL in eval mode: {streams} streams, no PWCA, no dropout; float32",
            "rollout": rollout,
        },
        "output": output_description(model, cfg, mode, embedding, classes, output_dim),
        "parity": parity,
        "source": {
            "checkpoint": str(checkpoint),
            "sha256": sha256(checkpoint),
            "backbone": cfg.model.backbone,
        },
        "versions": versions(fmt),
    }


def versions(fmt: str) -> dict[str, str]:
    """Versions of what produced the artefact (and, for ONNX, what the parity check ran it with)."""
    names = ["dual_cross_attention"] + (["onnx", "onnxruntime", "onnxscript"] if fmt == "onnx" else [])
    found = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def write_sidecar(description: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(description, indent=2) + "\n")
    return path
