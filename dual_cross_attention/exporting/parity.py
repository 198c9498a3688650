"""The parity check every export runs: the same images through PyTorch and through the artefact.

The images are generated, so the check needs no dataset: uniform noise (every patch differs,
attention spreads) and a smooth pattern (large uniform regions, as photographs have). The graph
is traced at ``EXAMPLE_BATCH`` images and checked at other batch sizes, so an artefact whose
batch size was fixed by the tracer fails here rather than in deployment.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from .formats import ExportError, Runner

TOLERANCE = 1e-4  # float32 max abs difference on probabilities / embeddings
EXAMPLE_BATCH = 2  # the batch size the graph is traced at
PARITY_BATCHES = (1, 3)  # the batch sizes it is checked at: each image alone, then all together


class ParityError(ExportError):
    """The artefact's outputs differ from PyTorch's by more than the tolerance, or its top-1 does."""

    def __init__(self, message: str, report: ParityReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class ParityReport:
    """What the parity check measured, over all images and batch sizes."""

    max_abs_difference: float
    tolerance: float
    images: int
    batch_sizes: tuple[int, ...]
    top1_agree: int | None  # images whose top-1 class agrees; None for embeddings

    @property
    def passed(self) -> bool:
        top1_ok = self.top1_agree is None or self.top1_agree == self.images
        return (
            math.isfinite(self.max_abs_difference) and self.max_abs_difference <= self.tolerance and top1_ok
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "batch_sizes": list(self.batch_sizes), "passed": self.passed}


def example_images(height: int, width: int) -> torch.Tensor:
    """(EXAMPLE_BATCH, 3, H, W) uniform noise in [0, 1] to trace with; not used by the check."""
    generator = torch.Generator().manual_seed(1)
    return torch.rand(EXAMPLE_BATCH, 3, height, width, generator=generator)


def parity_images(height: int, width: int) -> torch.Tensor:
    """(3, 3, H, W) deterministic images in [0, 1]: two of uniform noise, then a smooth pattern
    (a colour gradient per channel under a low-frequency sine)."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(2, 3, height, width, generator=generator)
    y = torch.linspace(0, 1, height).view(1, height, 1)
    x = torch.linspace(0, 1, width).view(1, 1, width)
    phase = torch.tensor([0.0, 2.0, 4.0]).view(3, 1, 1)
    smooth = 0.5 + 0.25 * (x - y) + 0.25 * torch.sin(2 * math.pi * (x + 0.5 * y) + phase)  # (3, H, W)
    return torch.cat([noise, smooth.clamp(0, 1).unsqueeze(0)])


def check_parity(
    reference: Runner,
    artifact: Runner,
    images: torch.Tensor,
    top1: bool,
    name: str = "the exported model",
    tolerance: float = TOLERANCE,
    batch_sizes: Sequence[int] = PARITY_BATCHES,
) -> ParityReport:
    """Compare ``artifact`` with ``reference`` on ``images`` (N, 3, H, W), the artefact run in
    batches of each of ``batch_sizes``; raises ``ParityError`` with the measured and the allowed
    difference (and the first top-1 disagreement) unless every output is within ``tolerance``
    and, with ``top1``, every image's top-1 class agrees.
    """
    expected = reference(images).float()  # (N, K) or (N, D)
    got = torch.stack([_in_batches(artifact, images, size, name, expected.shape) for size in batch_sizes])
    diff = (got - expected).abs().nan_to_num(nan=math.inf)  # (S, N, K): NaN counts as the worst
    same = got.argmax(dim=2) == expected.argmax(dim=1)  # (S, N)
    agree = int(same.all(dim=0).sum()) if top1 else None
    report = ParityReport(diff.max().item(), tolerance, len(images), tuple(batch_sizes), agree)
    if report.passed:
        return report
    s, i, j = (int(v) for v in torch.unravel_index(diff.argmax(), diff.shape))
    message = (
        f"parity check failed: {name} differs from PyTorch by max abs {report.max_abs_difference:.3g} "
        f"(allowed {tolerance:g}); the largest difference is at image {i}, output {j}, in batches of "
        f"{batch_sizes[s]}: PyTorch {expected[i, j].item():.6g}, exported {got[s, i, j].item():.6g}"
    )
    if top1:
        message += f"; top-1 agrees on {agree} of {len(images)} images"
        if agree < len(images):
            s, i = (int(v) for v in (~same).nonzero()[0])
            message += (
                f" (image {i} in batches of {batch_sizes[s]}: PyTorch class {int(expected[i].argmax())}, "
                f"exported {int(got[s, i].argmax())})"
            )
    raise ParityError(message, report)


def _in_batches(
    artifact: Runner, images: torch.Tensor, size: int, name: str, shape: torch.Size
) -> torch.Tensor:
    """The artefact's outputs for ``images`` run ``size`` at a time, checked to have ``shape``."""
    try:
        got = torch.cat([artifact(chunk).float() for chunk in images.split(size)])
    except RuntimeError as err:  # e.g. a traced reshape that kept the example's batch size
        raise ExportError(f"{name} fails on a batch of {size} image(s): {err}") from err
    if got.shape != shape:
        raise ExportError(
            f"{name} returns shape {tuple(got.shape)} for {len(images)} images in batches of {size}; "
            f"PyTorch returns {tuple(shape)}"
        )
    return got
