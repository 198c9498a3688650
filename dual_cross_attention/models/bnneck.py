"""BNNeck (Luo et al., "Bag of Tricks" for Re-ID; TransReID): a batch norm between the feature
and the classifier.

The triplet loss is taken on the feature before the norm, cross-entropy on the logits after it,
and retrieval on the normed feature. The norm's shift is frozen at zero, as in BoT, so the normed
feature stays centred for the cosine distance; the classifier has no bias for the same reason.
"""

from __future__ import annotations

import torch
from torch import nn


class BNNeckHead(nn.Module):
    """A drop-in for a ViT's ``head``: ``classifier(neck(features))``; ``neck`` alone gives the
    retrieval feature."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.neck = nn.BatchNorm1d(dim)
        self.neck.bias.requires_grad_(False)
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)  # BoT's init: small logits at the start

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C) pre-norm features -> (B, K) logits."""
        return self.classifier(self.neck(features))
