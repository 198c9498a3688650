"""The multi-task loss over the SA, GLCA and PWCA branches.

Uncertainty weighting (Kendall et al. 2018, as used by FairMOT and the DCAL paper):
L = sum_k 0.5 * (exp(-w_k) * L_k + w_k), with one learned w_k per branch. Two fixes for the
failure where the weights never moved are configurable: a small random initialisation of w_k
(so the branches do not start tied at exactly zero) and keeping w_k within [-clamp, clamp],
applied as a projection after each optimizer step so the gradient is never cut off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .models.dual_vit import DualViTOutput
from .retrieval.triplet import global_batch_hard_triplet_loss

BRANCHES = ("sa", "glca", "pwca")


@dataclass
class LossResult:
    total: torch.Tensor  # scalar to backpropagate
    per_branch: dict[str, torch.Tensor]  # unweighted cross-entropy of each branch that ran
    correct: dict[str, torch.Tensor]  # number of correct top-1 predictions of each branch


class DCALLoss(nn.Module):
    def __init__(
        self,
        branches: tuple[str, ...],
        weighting: str = "uncertainty",
        init_std: float = 0.1,
        clamp: float | None = 1.0,
        fixed_weights: dict[str, float] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        """Cross-entropy per branch, combined by learned uncertainty or fixed weights.

        Args:
            branches: the branches the model trains, in ``BRANCHES`` order (e.g. ("sa", "glca", "pwca")).
            weighting: "uncertainty" (learned w_k) or "fixed" (``fixed_weights``).
            init_std: std of the normal init of w_k; 0 starts them at zero.
            clamp: bound for |w_k| (projection after each step, see ``project``); None: unbounded.
            fixed_weights: branch -> weight, for ``weighting="fixed"``; missing branches weigh 1.
            label_smoothing: passed to cross-entropy.
        """
        super().__init__()
        unknown = set(branches) - set(BRANCHES)
        if unknown or not branches:
            raise ValueError(f"branches must be a non-empty subset of {BRANCHES}, got {branches}")
        self.branches = tuple(b for b in BRANCHES if b in branches)
        self.weighting = weighting
        self.clamp = clamp
        self.label_smoothing = label_smoothing
        if weighting == "uncertainty":
            self.log_vars = nn.Parameter(torch.randn(len(self.branches)) * init_std)
        elif weighting == "fixed":
            weights = fixed_weights or {}
            self.register_buffer("fixed", torch.tensor([float(weights.get(b, 1.0)) for b in self.branches]))
        else:
            raise ValueError(f"loss.weighting must be 'uncertainty' or 'fixed', got '{weighting}'")

    def branch_logits(self, out: DualViTOutput) -> dict[str, torch.Tensor]:
        logits = {b: getattr(out, f"{b}_logits") for b in self.branches}
        missing = [b for b, t in logits.items() if t is None]
        if missing:
            raise ValueError(
                f"the loss expects branches {self.branches} but the model produced no logits for {missing}; "
                "is the model in train mode, and do model.glca / model.pwca match the loss?"
            )
        return logits

    def branch_loss(
        self, out: DualViTOutput, name: str, logits: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """The unweighted loss of one branch: cross-entropy."""
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def forward(self, out: DualViTOutput, labels: torch.Tensor) -> LossResult:
        per_branch, correct = {}, {}
        for name, logits in self.branch_logits(out).items():
            per_branch[name] = self.branch_loss(out, name, logits, labels)
            correct[name] = (logits.argmax(dim=-1) == labels).sum()
        losses = torch.stack([per_branch[b] for b in self.branches])
        if self.weighting == "uncertainty":
            total = 0.5 * (torch.exp(-self.log_vars) * losses + self.log_vars).sum()
        else:
            total = (self.fixed * losses).sum()
        return LossResult(total=total, per_branch=per_branch, correct=correct)

    @torch.no_grad()
    def project(self) -> None:
        """Keep w_k inside [-clamp, clamp]; call after each optimizer step."""
        if self.weighting == "uncertainty" and self.clamp is not None:
            self.log_vars.clamp_(-self.clamp, self.clamp)

    @torch.no_grad()
    def raw_weights(self) -> dict[str, float]:
        """w_k for uncertainty weighting (what the paper's figures plot), else the fixed weights."""
        values = self.log_vars if self.weighting == "uncertainty" else self.fixed
        return {b: float(v) for b, v in zip(self.branches, values, strict=True)}


class ReIDLoss(DCALLoss):
    """Re-ID's loss per branch: cross-entropy on the logits plus batch-hard triplet on the branch's
    pre-BNNeck feature, mined over the global batch under torchrun (so the loss does not depend on
    how many processes share the batch); branches combined by the same weighting as FGVC."""

    def __init__(
        self, branches: tuple[str, ...], margin: float = 0.3, soft_margin: bool = False, **kwargs
    ) -> None:
        super().__init__(branches, **kwargs)
        self.margin = margin
        self.soft_margin = soft_margin

    def branch_loss(
        self, out: DualViTOutput, name: str, logits: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        features = getattr(out, f"{name}_features")
        triplet = global_batch_hard_triplet_loss(
            features.float(), labels, margin=self.margin, soft_margin=self.soft_margin
        )
        return super().branch_loss(out, name, logits, labels) + triplet


class ModelWithLoss(nn.Module):
    """The model and its loss as one module: DDP then averages the gradients of the loss
    weights together with the model's, so no process's weights drift from the others."""

    def __init__(self, model: nn.Module, criterion: DCALLoss) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> LossResult:
        return self.criterion(self.model(images), labels)
