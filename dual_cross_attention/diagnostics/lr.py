"""Check 1, the learning rate: the rule that gives 5e-4 at effective batch 16, warmup and cosine.

The linear rule of the paper (5e-4 x B/512) gives 1.5625e-5 at the physical batch 2 x
accumulation 8 that fits one GPU, 32x below the 5e-4 ViT fine-tuning needs there; the sqrt rule
(5e-4 x sqrt(B/16)) gives 5e-4. Every LR here comes from ``builders.build_schedule``, the
schedule the trainer builds, and is compared with those formulas written out in the checks,
with the effective batch written out too (batch x accumulation, one process).
"""

from __future__ import annotations

import math

from .. import builders
from ..config import TrainConfig
from ..optim import Schedule
from .result import CheckResult

# The schedule's shape does not depend on the dataset size, so it is checked over a nominal epoch.
NOMINAL_STEPS_PER_EPOCH = 100
WORLD_SIZE = 1  # test_fixes.py runs in one process
LOW_START = 0.1  # the first warmup step may use at most this fraction of the peak LR
END_TOLERANCE = 0.01  # the last optimizer step's LR may sit this fraction of (peak - min_lr) above min_lr


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)


def nominal_schedule(train: TrainConfig) -> Schedule:
    """The schedule the trainer builds for a one-process run of ``train`` whose epochs are
    ``NOMINAL_STEPS_PER_EPOCH`` optimizer steps."""
    batches = NOMINAL_STEPS_PER_EPOCH * train.gradient_accumulation_steps
    schedule, _ = builders.build_schedule(train, batches, WORLD_SIZE)
    return schedule


def check_rule_at_16(rule: str) -> CheckResult:
    """The trainer's peak LR for base_lr 5e-4 at effective batch 16 (16 x 1 accumulation) under
    ``rule``: 5e-4 for sqrt, 1.5625e-5 for the paper's linear rule."""
    at_16 = TrainConfig(base_lr=5e-4, batch_size=16, gradient_accumulation_steps=1, lr_scaling=rule)
    lr = nominal_schedule(at_16).peak_lr
    references = {
        "sqrt": (5e-4 * math.sqrt(16 / 16), "5e-4 x sqrt(16/16)"),
        "linear": (5e-4 * 16 / 512, "5e-4 x 16/512"),
    }
    reference, formula = references[rule]
    name, expected = f"lr.{rule}_rule_at_16", f"{reference:g} = {formula}"
    return CheckResult(name, _close(lr, reference), f"{lr:.6g}", expected)


def check_config_lr(train: TrainConfig) -> CheckResult:
    """The config's peak LR against the sqrt rule written out. ``lr_scaling: none`` passes (an LR
    set by hand, as the demo's); ``linear`` fails, because it is the rule that stalled training."""
    lr, used = nominal_schedule(train).peak_lr, builders.effective_batch(train, WORLD_SIZE)
    measured = (
        f"{lr:.6g} (lr_scaling {train.lr_scaling}, effective batch {used} = {train.batch_size} x "
        f"{train.gradient_accumulation_steps} accumulation, 1 process)"
    )
    batch = train.batch_size * train.gradient_accumulation_steps  # the reference: one process
    sqrt_lr = train.base_lr * math.sqrt(batch / 16)
    if train.lr_scaling == "none":
        return CheckResult(
            "lr.config", _close(lr, train.base_lr), measured, f"{train.base_lr:.4g}, base_lr as set"
        )
    expected = f"{sqrt_lr:.6g} = {train.base_lr:g} x sqrt({batch}/16)"
    if train.lr_scaling == "linear":
        expected += (
            f" (the linear rule gives {sqrt_lr / lr:.0f}x less, the LR that stalled training: "
            "set train.lr_scaling=sqrt)"
        )
        return CheckResult("lr.config", False, measured, expected)
    return CheckResult("lr.config", _close(lr, sqrt_lr), measured, expected)


def check_warmup(schedule: Schedule) -> CheckResult:
    """Warmup starts low, rises every step and reaches the peak on its last step, never above it."""
    peak, warmup = schedule.peak_lr, schedule.warmup_steps
    expected = (
        f"step 0 <= {LOW_START * peak:.3g} ({LOW_START:.0%} of peak), rising to the peak {peak:.4g} "
        "at the end of warmup"
    )
    if warmup < 1:
        return CheckResult("lr.warmup", False, "no warmup (0 steps): set train.warmup_epochs > 0", expected)
    lrs = [schedule(step) for step in range(schedule.total_steps + 1)]
    rising = all(a < b for a, b in zip(lrs[: warmup - 1], lrs[1:warmup], strict=True))
    top = max(lrs)
    passed = (
        lrs[0] <= LOW_START * peak and rising and _close(lrs[warmup - 1], peak) and top <= peak * (1 + 1e-9)
    )
    measured = (
        f"step 0: {lrs[0]:.3g}, step {warmup - 1} (last of {warmup} warmup steps): {lrs[warmup - 1]:.4g}, "
        f"{'rising' if rising else 'not rising'}, highest {top:.4g}"
    )
    return CheckResult("lr.warmup", passed, measured, expected)


def check_cosine_end(schedule: Schedule) -> CheckResult:
    """After warmup the LR never rises and ends at ``min_lr``."""
    peak, floor, warmup, total = (
        schedule.peak_lr,
        schedule.min_lr,
        schedule.warmup_steps,
        schedule.total_steps,
    )
    expected = f"never rising after warmup, ending at min_lr {floor:.3g}"
    if total <= warmup:
        return CheckResult(
            "lr.cosine_end", False, f"no decay phase ({warmup} warmup of {total} steps)", expected
        )
    lrs = [schedule(step) for step in range(warmup, total + 1)]
    falling = all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    last, end = lrs[-2], lrs[-1]
    passed = falling and _close(end, floor) and last - floor <= END_TOLERANCE * (peak - floor)
    measured = (
        f"{'non-increasing' if falling else 'rises again'} over steps {warmup}-{total - 1}; last step: "
        f"{last:.4g}, end: {end:.4g}"
    )
    return CheckResult("lr.cosine_end", passed, measured, expected)


def lr_checks(train: TrainConfig) -> list[CheckResult]:
    schedule = nominal_schedule(train)
    return [
        check_rule_at_16("sqrt"),
        check_rule_at_16("linear"),
        check_config_lr(train),
        check_warmup(schedule),
        check_cosine_end(schedule),
    ]
