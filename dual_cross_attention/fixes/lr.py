"""Check 1, the learning rate: the rule that gives 5e-4 at effective batch 16, warmup and cosine.

The implementation this project replaces used the paper's linear rule (5e-4 / 512 x batch),
which at the physical batch 2 x accumulation 8 that fits one GPU gives 1.5625e-5, 32 times
less than the 5e-4 ViT fine-tuning needs there. The fix is square-root scaling from 5e-4 at
effective batch 16, after a warmup. These checks call the package's rule and schedule and
compare them with the formulas written out here.
"""

from __future__ import annotations

import math

from ..config import TrainConfig
from ..optim import Schedule, scaled_lr
from .result import CheckResult

REFERENCE_BASE_LR = 5e-4
REFERENCE_BATCH = 16  # the paper's batch; the sqrt rule's base_lr is the LR at this batch
SQRT_LR_AT_16 = 5e-4
LINEAR_LR_AT_16 = 1.5625e-5  # 5e-4 / 512 x 16
# The schedule's shape does not depend on the dataset size, so it is checked over a nominal epoch.
NOMINAL_STEPS_PER_EPOCH = 100
LOW_START = 0.1  # the first warmup step may use at most this fraction of the peak LR
END_TOLERANCE = 0.01  # the last optimizer step's LR may sit this fraction of (peak - min_lr) above min_lr


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)


def check_sqrt_rule() -> CheckResult:
    """The package's sqrt rule gives 5e-4 at effective batch 16 (the shipped fix)."""
    lr, _ = scaled_lr(REFERENCE_BASE_LR, REFERENCE_BATCH, "sqrt")
    return CheckResult(
        "lr.sqrt_rule_at_16",
        _close(lr, SQRT_LR_AT_16),
        f"{lr:.6g}",
        f"{SQRT_LR_AT_16:g} = 5e-4 x sqrt(16/16)",
    )


def check_linear_rule() -> CheckResult:
    """The paper's linear rule stays available and gives 1.5625e-5 at batch 16."""
    lr, _ = scaled_lr(REFERENCE_BASE_LR, REFERENCE_BATCH, "linear")
    return CheckResult(
        "lr.linear_rule_at_16",
        _close(lr, LINEAR_LR_AT_16),
        f"{lr:.6g}",
        f"{LINEAR_LR_AT_16:g} = 5e-4 x 16/512",
    )


def effective_batch(train: TrainConfig) -> int:
    """Images per optimizer step in a single-process run."""
    return train.batch_size * train.gradient_accumulation_steps


def check_config_lr(train: TrainConfig) -> CheckResult:
    """The config's peak LR against the sqrt rule written out. ``lr_scaling: none`` passes (an LR
    set by hand, as the demo's); ``linear`` fails, because it is the rule that stalled training."""
    batch = effective_batch(train)
    lr, _ = scaled_lr(train.base_lr, batch, train.lr_scaling)
    measured = (
        f"{lr:.6g} (lr_scaling {train.lr_scaling}, effective batch {batch} = {train.batch_size} x "
        f"{train.gradient_accumulation_steps} accumulation, 1 process)"
    )
    sqrt_lr = train.base_lr * math.sqrt(batch / REFERENCE_BATCH)
    if train.lr_scaling == "none":
        return CheckResult(
            "lr.config", _close(lr, train.base_lr), measured, f"{train.base_lr:.4g}, base_lr as set"
        )
    expected = f"{sqrt_lr:.6g} = {train.base_lr:g} x sqrt({batch}/{REFERENCE_BATCH})"
    if train.lr_scaling == "linear":
        expected += (
            f" (the linear rule gives {sqrt_lr / lr:.0f}x less, the LR that stalled training: "
            "set train.lr_scaling=sqrt)"
        )
        return CheckResult("lr.config", False, measured, expected)
    return CheckResult("lr.config", _close(lr, sqrt_lr), measured, expected)


def config_schedule(train: TrainConfig, steps_per_epoch: int = NOMINAL_STEPS_PER_EPOCH) -> Schedule:
    """The warmup + cosine schedule a single-process run of ``train`` uses, as the trainer builds
    it (warmup rounded to whole optimizer steps)."""
    peak, _ = scaled_lr(train.base_lr, effective_batch(train), train.lr_scaling)
    return Schedule(
        peak_lr=peak,
        min_lr=train.min_lr,
        warmup_steps=round(train.warmup_epochs * steps_per_epoch),
        total_steps=train.epochs * steps_per_epoch,
    )


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
    schedule = config_schedule(train)
    return [
        check_sqrt_rule(),
        check_linear_rule(),
        check_config_lr(train),
        check_warmup(schedule),
        check_cosine_end(schedule),
    ]
