"""The model the memory and GLCA/PWCA checks run: the config's backbone, made affordable.

It is built with ``build_model`` from a copy of the config, so it is the model a run would
train, except: no pretrained weights (the checks are about structure and cost, and need no
download), no stochastic depth (the identity-pair invariant holds only without it), and, when
asked (a big config on a CPU), fewer blocks and a smaller image. The report states each change.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import timm
import torch

from ..builders import build_model
from ..config import Config
from ..models import DualViT

PROBE_CLASSES = 200  # as the cost benchmarks; the head is a negligible share of the cost


@dataclass(frozen=True)
class Probe:
    """A config for check models and what was changed from the user's config, for the report."""

    cfg: Config
    note: str  # e.g. "vit_base_patch16_224.augreg_in21k at 224 px, reduced: depth 2 of 12, 448 -> 224 px"


def backbone_depth(cfg: Config) -> int:
    """Blocks of the config's backbone, read from a copy built on the meta device (no memory, no
    weights): a name alone does not say, and ``backbone_kwargs`` may override it."""
    with torch.device("meta"):
        backbone = timm.create_model(
            cfg.model.backbone, pretrained=False, img_size=cfg.data.img_size, **cfg.model.backbone_kwargs
        )
    return len(backbone.blocks)


def make_probe(cfg: Config, max_depth: int | None = None, max_img_size: int | None = None) -> Probe:
    """A copy of ``cfg`` for check models.

    Args:
        cfg: the config under test (left unchanged).
        max_depth: cap on the number of blocks (None: the backbone's own), to make a ViT-B
            affordable on a CPU: the cost check extrapolates from 1 and 2 blocks, and the 20-step
            and GLCA/PWCA checks test code paths that 2 blocks exercise fully.
        max_img_size: cap on the image size (None: the config's).
    """
    probe = copy.deepcopy(cfg)
    probe.model.pretrained = False
    probe.model.pretrained_path = None
    probe.model.drop_path_rate = 0.0
    changes = []
    if max_depth is not None:
        depth = backbone_depth(cfg)
        if depth > max_depth:
            probe.model.backbone_kwargs["depth"] = max_depth
            changes.append(f"depth {max_depth} of {depth}")
    if max_img_size is not None and probe.data.img_size > max_img_size:
        changes.append(f"{probe.data.img_size} -> {max_img_size} px")
        probe.data.img_size = max_img_size
    note = f"{probe.model.backbone} at {probe.data.img_size} px"
    if changes:
        note += f", reduced: {', '.join(changes)}"
    return Probe(cfg=probe, note=note)


def build_probe_model(probe: Probe, device: torch.device, seed: int = 0) -> DualViT:
    """The probe's model with weights drawn from ``seed`` (the global RNG is reseeded), so every
    run of the checks measures the same model."""
    torch.manual_seed(seed)
    return build_model(probe.cfg, PROBE_CLASSES).to(device)


def probe_batch(
    probe: Probe, batch_size: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images (B, 3, H, W) and labels (B,), reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    size = probe.cfg.data.img_size
    images = torch.randn(batch_size, 3, size, size, generator=generator)
    labels = torch.randint(0, PROBE_CLASSES, (batch_size,), generator=generator)
    return images.to(device), labels.to(device)
