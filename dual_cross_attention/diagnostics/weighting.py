"""Check 4, loss weighting: the learned uncertainty weights move and tell the branches apart.

The loss module a run builds is trained, with the trainer's optimizer groups and its
projection after each step, on a controlled case: constant branch losses that differ. Kendall's
loss 0.5 (exp(-w) L + w) is smallest at w = log L, so each weight must leave its start and the
weights must end ordered as their losses (up to ``loss.clamp``). Weights whose gradient is cut,
that are frozen or missing from the optimizer, or that a tiny clamp pins, fail.
"""

from __future__ import annotations

import math

import torch

from ..losses import BRANCHES, DCALLoss
from ..models import DualViTOutput
from ..optim import parameter_groups
from .result import CheckResult, skipped

# Optimal weights log L: about -0.92, 0.47 and 0.96, inside the default clamp of 1, away from the
# start (std 0.1 around 0) and at least 0.45 apart.
CONTROLLED_LOSSES = {"sa": 0.4, "glca": 1.6, "pwca": 2.6}
STEPS = 300
LR = 0.01  # a controlled case: Adam moves each weight about LR per step
MIN_MOVE = 0.1
MIN_GAP = 0.2


def controlled_output(losses: dict[str, float]) -> DualViTOutput:
    """One image of label 0 whose branch logits (0, d) give cross-entropy log(1 + e^d) = L_k."""

    def logits(loss: float) -> torch.Tensor:
        return torch.tensor([[0.0, math.log(math.expm1(loss))]])

    branch_logits = {f"{branch}_logits": logits(loss) for branch, loss in losses.items()}
    return DualViTOutput(sa_features=torch.zeros(1, 1), **branch_logits)


def train_weights(
    criterion: DCALLoss, losses: dict[str, float], steps: int = STEPS, lr: float = LR
) -> tuple[dict[str, float], dict[str, float]]:
    """Weights before and after ``steps`` AdamW steps (with ``project`` after each, as in training).
    ``criterion`` is on the CPU. Weights the optimizer groups leave out (frozen) stay where they are."""
    start = criterion.raw_weights()
    groups = [g for g in parameter_groups({"loss": criterion}, weight_decay=0.05) if g["params"]]
    if groups:
        optimizer = torch.optim.AdamW(groups, lr=lr)
        out, labels = controlled_output(losses), torch.tensor([0])
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            criterion(out, labels).total.backward()
            optimizer.step()
            criterion.project()
    return start, criterion.raw_weights()


def _describe(start: dict[str, float], end: dict[str, float]) -> str:
    return ", ".join(f"{b} {start[b]:+.3f} -> {end[b]:+.3f}" for b in end)


def check_weights_move(start: dict[str, float], end: dict[str, float]) -> CheckResult:
    moved = min(abs(end[b] - start[b]) for b in end)
    return CheckResult(
        "weighting.moved",
        moved >= MIN_MOVE,
        f"{_describe(start, end)} (smallest move {moved:.3f})",
        f"every weight moves >= {MIN_MOVE} from its start",
    )


def check_weights_apart(end: dict[str, float], losses: dict[str, float], clamp: float | None) -> CheckResult:
    """Ordered as the losses and at least MIN_GAP apart; the optimum log L (clamped) is shown too."""
    order = sorted(end, key=lambda b: losses[b])
    gaps = [end[b] - end[a] for a, b in zip(order, order[1:], strict=False)]
    bound = math.inf if clamp is None else clamp
    optimum = ", ".join(f"{b} {max(-bound, min(bound, math.log(losses[b]))):+.2f}" for b in order)
    return CheckResult(
        "weighting.apart",
        min(gaps) >= MIN_GAP,
        f"{' < '.join(f'{b} {end[b]:+.3f}' for b in order)}, smallest gap {min(gaps):.3f}",
        f"ordered as the losses {', '.join(f'{b} {losses[b]:g}' for b in order)}, gaps >= {MIN_GAP} "
        f"(optimum log L: {optimum})",
    )


def weighting_checks(criterion: DCALLoss, losses: dict[str, float] = CONTROLLED_LOSSES) -> list[CheckResult]:
    """Both checks on ``criterion``, the loss module a run builds (``build_loss``)."""
    names = ("weighting.moved", "weighting.apart")
    if criterion.weighting != "uncertainty":
        return [
            skipped(n, "loss.weighting is fixed: no learned weights", "uncertainty weighting") for n in names
        ]
    if len(criterion.branches) < 2:
        return [skipped(n, "only the SA branch is on", "two or more branches") for n in names]
    losses = {b: losses[b] for b in BRANCHES if b in criterion.branches}
    start, end = train_weights(criterion, losses)
    return [check_weights_move(start, end), check_weights_apart(end, losses, criterion.clamp)]
