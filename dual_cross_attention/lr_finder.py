"""Learning-rate range test (Smith 2015; the fastai "LR finder") for the full DCAL step.

The LR grows exponentially from ``start`` to ``end`` over ``steps`` optimizer steps of the real
training step (all branches, uncertainty loss, accumulation, AMP). The loss is smoothed with a
bias-corrected exponential moving average, and the test stops early once the smoothed loss
exceeds ``diverge_factor`` times its minimum. Model, loss weights, optimizer and scaler are
restored afterwards: the test trains nothing.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from .builders import build_training, effective_batch
from .config import Config
from .distributed import all_reduce_sum, init_distributed
from .engine import accumulate_gradients, accumulation_windows, clipped_parameters, optimizer_step, unwrap
from .errors import UsageError
from .optim import scaled_lr, set_lr
from .runtime import resolve_device

_logger = logging.getLogger(__name__)


@dataclass
class LRFindResult:
    lrs: list[float]
    losses: list[float]  # raw loss of each optimizer step (mean over its micro-batches)
    smoothed: list[float]  # bias-corrected exponential moving average
    steepest_lr: float  # where the smoothed loss falls fastest per decade of LR
    min_over_10_lr: float  # the LR of the smoothed minimum, divided by 10
    stopped_early: bool
    reason: str  # why it stopped


def lr_at(step: int, steps: int, start: float, end: float) -> float:
    """Exponential sweep: ``start`` at step 0, ``end`` at step ``steps - 1``."""
    return start * (end / start) ** (step / max(1, steps - 1))


def _batches(loader: Iterable) -> Iterator:
    """The loader's batches, starting over when it runs out (the test may outlast an epoch)."""
    while True:
        yield from loader


def suggest(lrs: list[float], smoothed: list[float], skip: int = 3) -> tuple[float, float]:
    """(steepest-descent LR, LR at the minimum / 10) of a smoothed loss curve.

    The slope is taken against log10(LR), over the part of the curve before its minimum,
    leaving out the first ``skip`` points, where the moving average is least settled.
    """
    best = min(range(len(smoothed)), key=smoothed.__getitem__)
    lo = min(skip, max(0, best - 1))
    slopes = [
        (smoothed[i + 1] - smoothed[i]) / (math.log10(lrs[i + 1]) - math.log10(lrs[i]))
        for i in range(lo, max(lo + 1, best))
        if i + 1 < len(lrs)
    ]
    steepest = lrs[lo + min(range(len(slopes)), key=slopes.__getitem__)] if slopes else lrs[best]
    return steepest, lrs[best] / 10.0


def lr_range_test(
    module: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    amp_dtype: torch.dtype,
    accumulation: int,
    clip_grad: float | None,
    start: float = 1e-7,
    end: float = 1.0,
    steps: int = 100,
    beta: float = 0.98,
    diverge_factor: float = 4.0,
) -> LRFindResult:
    """Run the range test on ``module`` (a ModelWithLoss, possibly DDP-wrapped), then restore it.

    Args:
        accumulation: micro-batches per optimizer step, as in training.
        start, end, steps: the exponential LR sweep.
        beta: smoothing of the loss average.
        diverge_factor: stop once the smoothed loss exceeds this multiple of its minimum.
    """
    if not 0 < start < end:
        raise UsageError(f"lr_find needs 0 < start < end, got start={start}, end={end}")
    if steps < 2:
        raise UsageError(f"lr_find.steps must be >= 2, got {steps}")
    inner = unwrap(module)
    saved = copy.deepcopy({"module": inner.state_dict(), "optimizer": optimizer.state_dict()})
    saved_scaler = scaler.state_dict()
    params = clipped_parameters(module)
    criterion = inner.criterion
    module.train()
    lrs, losses, smoothed = [], [], []
    average, reason = 0.0, f"reached end LR {end:g}"
    try:
        optimizer.zero_grad(set_to_none=True)
        for step, window in zip(
            range(steps), accumulation_windows(_batches(loader), accumulation), strict=False
        ):
            lr = lr_at(step, steps, start, end)
            set_lr(optimizer, lr)
            totals = accumulate_gradients(module, window, scaler, device, amp_dtype)
            bad = optimizer_step(
                optimizer, scaler, params, clip_grad, totals.branch_losses, criterion.branches
            )
            criterion.project()
            summed = all_reduce_sum(totals.loss_sum[:1] / totals.images)  # mean total loss of this process
            loss = float(summed) / _world_size()
            if bad is not None or not math.isfinite(loss):
                reason = f"{bad or 'loss'} became non-finite at LR {lr:.3g}"
                break
            average = beta * average + (1 - beta) * loss
            lrs.append(lr)
            losses.append(loss)
            smoothed.append(average / (1 - beta ** (step + 1)))
            if smoothed[-1] > diverge_factor * min(smoothed):
                reason = f"smoothed loss exceeded {diverge_factor:g}x its minimum at LR {lr:.3g}"
                break
    finally:
        inner.load_state_dict(saved["module"])
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved_scaler)
        optimizer.zero_grad(set_to_none=True)
    if len(smoothed) < 2:
        raise UsageError(
            f"the LR range test stopped after {len(smoothed)} steps ({reason}); lower lr_find.start"
        )
    steepest, min_over_10 = suggest(lrs, smoothed)
    stopped_early = len(lrs) < steps
    _logger.info("LR range test: %d steps, %s", len(lrs), reason)
    return LRFindResult(lrs, losses, smoothed, steepest, min_over_10, stopped_early, reason)


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def write_report(
    result: LRFindResult, run_dir: Path, config_lr: float, config_rule: str
) -> tuple[Path, Path]:
    """lr_find.csv (one row per step) and lr_find.png (smoothed loss vs LR, suggestions marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir.mkdir(parents=True, exist_ok=True)
    csv = run_dir / "lr_find.csv"
    pd.DataFrame({"lr": result.lrs, "loss": result.losses, "smoothed_loss": result.smoothed}).to_csv(
        csv, index=False
    )
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(result.lrs, result.smoothed, label="smoothed loss")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (smoothed)")
    marks = (
        (result.steepest_lr, "tab:red", f"steepest descent {result.steepest_lr:.2e}"),
        (result.min_over_10_lr, "tab:green", f"minimum / 10 {result.min_over_10_lr:.2e}"),
        (config_lr, "tab:gray", f"config ({config_rule}) {config_lr:.2e}"),
    )
    for lr, colour, label in marks:
        ax.axvline(lr, color=colour, linestyle="--", label=label)
    ax.set_title(f"LR range test ({len(result.lrs)} steps; {result.reason})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = run_dir / "lr_find.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return csv, png


def find_lr(cfg: Config) -> tuple[LRFindResult, float, str]:
    """Build the run as train.py would and range-test its LR; rank 0 writes the report.

    Returns the result with the peak LR the config would use and the rule behind it.
    """
    dist = init_distributed(resolve_device(cfg.train.device))
    parts = build_training(cfg, dist)
    f, t = cfg.lr_find, cfg.train
    result = lr_range_test(
        parts.step_module, parts.train_loader, parts.optimizer, parts.scaler, parts.device, parts.amp_dtype,
        t.gradient_accumulation_steps, t.clip_grad, start=f.start, end=f.end, steps=f.steps,
        beta=f.smoothing, diverge_factor=f.diverge_factor,
    )  # fmt: skip
    config_lr, rule = scaled_lr(t.base_lr, effective_batch(t, dist.world_size), t.lr_scaling)
    if dist.is_main:
        csv, png = write_report(result, Path(cfg.run.output_dir) / cfg.run.name, config_lr, t.lr_scaling)
        _logger.info("LR finder wrote %s and %s", csv, png)
    return result, config_lr, rule
