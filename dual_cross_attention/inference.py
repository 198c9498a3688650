"""Class probabilities of a DCAL model in inference mode, per mode, with optional flip TTA.

The one place that turns a model's outputs into the probabilities that evaluation, training-time
evaluation and prediction rank; ``flip_averaged`` is the test-time flip that these and the Re-ID
embeddings (``evaluation.reid``) share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .errors import UsageError
from .models.dual_vit import PREDICT_MODES, DualViT, DualViTOutput, combine_probabilities
from .runtime import autocast

TTA_CHOICES = ("none", "flip")


def available_modes(model: DualViT) -> tuple[str, ...]:
    """Inference modes ``model`` can run: all three with GLCA, else only ``sa``."""
    return PREDICT_MODES if model.use_glca else ("sa",)


def check_mode(mode: str, available: Sequence[str]) -> None:
    """Refuse a mode the model cannot run, saying why (no GLCA branch) rather than failing later."""
    if mode not in available:
        reason = " (this model was trained with model.glca: false)" if mode in PREDICT_MODES else ""
        raise UsageError(f"mode '{mode}' is not available{reason}; choose one of {list(available)}")


@torch.no_grad()
def flip_averaged(
    model: DualViT,
    images: torch.Tensor,
    extract: Callable[[DualViTOutput], dict[str, torch.Tensor]],
    tta: str = "none",
    amp_dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], DualViTOutput]:
    """The test-time augmentation every inference path shares (evaluation, training-time
    evaluation, prediction; FGVC and Re-ID): ``extract`` turns one forward's output into named
    (B, ...) tensors, which with ``tta='flip'`` are averaged over the images and their horizontal
    mirrors. Returns them and the model output for the images as given (rollout, selected patches).

    Args:
        images: (B, 3, H, W) normalised images.
        extract: e.g. the probabilities of each mode (``class_probabilities``) or each branch's
            retrieval feature (``evaluation.reid.image_embeddings``).
    """
    if tta not in TTA_CHOICES:
        raise UsageError(f"tta must be one of {TTA_CHOICES}, got '{tta}'")
    if model.training:
        raise ValueError("inference needs the model in eval mode (model.eval()): PWCA and dropout")
    views = [images] if tta == "none" else [images, images.flip(-1)]  # (B, 3, H, W): flip the width
    outputs, extracted = [], []
    for view in views:
        with autocast(images.device, amp_dtype):
            outputs.append(model(view))
        extracted.append(extract(outputs[-1]))
    averaged = {key: torch.stack([e[key] for e in extracted]).mean(dim=0) for key in extracted[0]}
    return averaged, outputs[0]


def class_probabilities(
    model: DualViT,
    images: torch.Tensor,
    modes: Sequence[str],
    tta: str = "none",
    amp_dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], DualViTOutput]:
    """Probabilities (B, K) per inference mode, and the model output for the images as given.

    ``sa+glca`` is the paper's rule, softmax(SA) + softmax(GLCA) (values sum to 2). With
    ``tta='flip'`` each mode's probabilities are averaged over the image and its horizontal
    mirror (``flip_averaged``).
    """

    def probabilities(out: DualViTOutput) -> dict[str, torch.Tensor]:
        return {m: combine_probabilities(out, m) for m in modes}

    return flip_averaged(model, images, probabilities, tta, amp_dtype)


def as_distribution(probs: torch.Tensor, mode: str) -> torch.Tensor:
    """Probabilities that sum to one: ``sa+glca`` sums two softmax outputs, so it is halved
    (the mean of the two). Ranking is unchanged."""
    return probs / 2 if mode == "sa+glca" else probs
