"""Check 5, GLCA and PWCA: the two branches do what the paper says, on a real (probe) model.

Each check tests one property against a reference written out here: rollout rows are
distributions, GLCA's queries are the top-R patches by rollout, every parameter learns, PWCA's
distractor changes its output (and so the loss) in training while inference does no PWCA work,
and with each image as its own distractor PWCA is exactly SA (softmax over [K1; K1] gives K1's
weights).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import DCALLoss
from ..models import DualViT, DualViTOutput
from .cost import count_flops
from .result import CheckResult, skipped

MASS_TOLERANCE = 1e-4  # a rollout row over the patches may exceed 1 by this much (float rounding)
PWCA_EFFECT_MIN = 1e-3  # max |PWCA - SA| logits with a real distractor
IDENTITY_TOLERANCE = 1e-4  # max |PWCA - SA| logits with each image as its own distractor (fp32)


def check_rollout_rows(rollouts: dict[str, torch.Tensor]) -> CheckResult:
    """Rollout rows (B, P) of each path are finite and non-negative, and their patch mass is in
    (0, 1]: the full row of a product of row-stochastic maps sums to 1, the prefix tokens hold the
    rest."""
    parts, passed = [], True
    for path, rollout in rollouts.items():
        rows = rollout.detach().double()
        finite = bool(torch.isfinite(rows).all())
        mass = rows.sum(dim=1)
        low, high, smallest = float(mass.min()), float(mass.max()), float(rows.min())
        passed &= finite and smallest >= 0.0 and low > 0.0 and high <= 1.0 + MASS_TOLERANCE
        parts.append(
            f"{path}: {'finite' if finite else 'NOT finite'}, min {smallest:.3g}, "
            f"patch mass {low:.3f}-{high:.3f}"
        )
    return CheckResult(
        "branches.rollout_rows", passed, "; ".join(parts), "finite, >= 0, patch mass in (0, 1] on every path"
    )


def check_top_r(rollout: torch.Tensor, local_index: torch.Tensor, top_ratio: float) -> CheckResult:
    """GLCA's local queries are the ceil(R x P) patches with the highest rollout (ties either way)."""
    batch, patches = rollout.shape
    k = min(patches, max(1, math.ceil(top_ratio * patches)))
    expected = (
        f"k = ceil({top_ratio:g} x {patches}) = {k} distinct patches, the highest by rollout, in every image"
    )
    if local_index.shape != (batch, k):
        return CheckResult(
            "branches.glca_top_r", False, f"local_index shape {tuple(local_index.shape)}", expected
        )
    good = 0
    for row, picked in zip(rollout.detach(), local_index, strict=True):
        chosen = torch.zeros(patches, dtype=torch.bool, device=row.device)
        chosen[picked] = True
        distinct = int(chosen.sum()) == k
        good += distinct and (k == patches or float(row[chosen].min()) >= float(row[~chosen].max()))
    measured = f"k = {k} of {patches} patches; the top {k} in {good}/{batch} images"
    return CheckResult("branches.glca_top_r", good == batch, measured, expected)


def check_gradients(named_parameters: Iterable[tuple[str, nn.Parameter]]) -> CheckResult:
    """After one backward of the DCAL loss every trainable parameter has a finite, non-zero gradient."""
    total, missing = 0, []
    counts = {"backbone": [0, 0], "glca": [0, 0]}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        total += 1
        part = counts["backbone" if name.startswith("backbone.") else "glca"]
        part[1] += 1
        grad = param.grad
        if grad is None or not bool(torch.isfinite(grad).all()) or not bool(grad.any()):
            missing.append(name)
        else:
            part[0] += 1
    (bb_ok, bb_all), (glca_ok, glca_all) = counts["backbone"], counts["glca"]
    measured = (
        f"{total - len(missing)}/{total} parameters (backbone {bb_ok}/{bb_all}, GLCA {glca_ok}/{glca_all})"
    )
    if missing:
        measured += f"; without: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
    return CheckResult(
        "branches.gradients", not missing and total > 0, measured, "every backbone and GLCA parameter"
    )


def check_pwca_changes_loss(out: DualViTOutput, labels: torch.Tensor) -> CheckResult:
    """With a real distractor, PWCA's logits (and so its loss term) differ from SA's."""
    expected = f"max |PWCA - SA| logits > {PWCA_EFFECT_MIN:g} with a derangement as distractors"
    if out.pwca_logits is None:
        return CheckResult("branches.pwca_in_training", False, "no PWCA logits in training", expected)
    sa, pwca = out.sa_logits.detach().float(), out.pwca_logits.detach().float()
    diff = float((pwca - sa).abs().max())
    sa_ce, pwca_ce = float(F.cross_entropy(sa, labels)), float(F.cross_entropy(pwca, labels))
    measured = f"max |PWCA - SA| logits {diff:.3g}; cross-entropy SA {sa_ce:.4f}, PWCA {pwca_ce:.4f}"
    return CheckResult("branches.pwca_in_training", diff > PWCA_EFFECT_MIN, measured, expected)


def check_pwca_absent_at_inference(model: DualViT, images: torch.Tensor) -> CheckResult:
    """In eval mode there are no PWCA logits and the FLOPs equal those of the model with PWCA off."""
    was_training, had_pwca = model.training, model.use_pwca
    model.eval()
    try:
        with torch.no_grad():
            present = model(images).pwca_logits is not None
            with_pwca = count_flops(lambda: model(images))
            model.use_pwca = False
            without = count_flops(lambda: model(images))
    finally:
        model.use_pwca = had_pwca
        model.train(was_training)
    measured = (
        f"PWCA logits {'present' if present else 'absent'}; "
        f"inference FLOPs {with_pwca / without:.4f}x those with PWCA off"
    )
    return CheckResult(
        "branches.pwca_not_at_inference",
        not present and with_pwca == without,
        measured,
        "absent, 1.0000x (no PWCA work at inference)",
    )


def check_identity_pairs(out: DualViTOutput) -> CheckResult:
    """``out`` ran with pair_index = arange(B) and no stochastic depth: PWCA must equal SA."""
    expected = f"max |PWCA - SA| logits <= {IDENTITY_TOLERANCE:g}"
    if out.pwca_logits is None:
        return CheckResult("branches.identity_pairs", False, "no PWCA logits in training", expected)
    diff = float((out.pwca_logits - out.sa_logits).detach().abs().max())
    return CheckResult(
        "branches.identity_pairs", diff <= IDENTITY_TOLERANCE, f"max |PWCA - SA| logits {diff:.2g}", expected
    )


def _has_stochastic_depth(model: nn.Module) -> bool:
    return any(getattr(module, "drop_prob", 0.0) > 0.0 for module in model.modules())


def branch_checks(
    model: DualViT, criterion: DCALLoss, images: torch.Tensor, labels: torch.Tensor
) -> list[CheckResult]:
    """All GLCA/PWCA checks on one batch (B >= 2) of a model built without stochastic depth."""
    if _has_stochastic_depth(model):
        raise ValueError("the identity-pair invariant needs a model built with drop_path_rate=0")
    batch = images.shape[0]
    identity = torch.arange(batch, device=images.device)
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(images, pair_index=identity.roll(1))  # a derangement: each image gets the previous one
    criterion(out, labels).total.backward()
    results = []
    if model.use_glca:
        with torch.no_grad():
            eval_out = model.eval()(images)
        model.train()
        results.append(check_rollout_rows({"train": out.rollout, "eval": eval_out.rollout}))
        if model.glca_select == "rollout":
            results.append(check_top_r(out.rollout, out.local_index, model.top_ratio))
        else:
            why = f"model.glca_select is {model.glca_select}: GLCA's patches are not the top-R by rollout"
            results.append(skipped("branches.glca_top_r", why, "glca_select: rollout"))
    else:
        for name in ("branches.rollout_rows", "branches.glca_top_r"):
            results.append(skipped(name, "model.glca is false", "GLCA on"))
    results.append(check_gradients(model.named_parameters()))
    model.zero_grad(set_to_none=True)
    if model.use_pwca:
        results.append(check_pwca_changes_loss(out, labels))
        results.append(check_pwca_absent_at_inference(model, images))
        results.append(check_identity_pairs(model(images, pair_index=identity)))
    else:
        for name in (
            "branches.pwca_in_training",
            "branches.pwca_not_at_inference",
            "branches.identity_pairs",
        ):
            results.append(skipped(name, "model.pwca is false", "PWCA on"))
    return results
