"""Inference speed of a trained model: the plain ViT forward (SA only) against DCAL's (SA+GLCA)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..prediction import TrainedModel
from ..runtime import autocast


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
