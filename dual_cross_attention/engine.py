"""The two loops, ``train_one_epoch`` and ``evaluate``, and the optimizer step they are made of.

Gradient accumulation is done in the open: ``accumulation_windows`` groups the micro-batches of
each optimizer step (the last window of an epoch may be shorter), ``accumulate_gradients``
divides each micro-batch loss by the size of its window, and the LR is set from the
optimizer-step counter right before each step. Values are moved to the host only once per
optimizer step (the finiteness check) and at log time.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from .distributed import all_reduce_sum
from .errors import DcalError
from .evaluation.metrics import Tally
from .inference import class_probabilities
from .losses import LossResult
from .optim import set_lr
from .runtime import autocast, maybe_empty_cache


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return getattr(module, "module", module)


class TrainingDiverged(DcalError, RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


@dataclass
class StepSettings:
    accumulation: int
    clip_grad: float | None
    max_bad_steps: int
    empty_cache_every: int
    log_every: int
    amp_dtype: torch.dtype
    show_progress: bool = True


@dataclass
class EpochStats:
    loss: float
    branch_loss: dict[str, float]
    branch_acc: dict[str, float]  # percent
    images: int
    steps: int  # optimizer steps taken (skipped ones included)
    skipped_steps: int
    bad_streak: int  # consecutive skipped steps at the end of the epoch
    lr: float
    seconds: float


def clipped_parameters(module: nn.Module) -> list[torch.Tensor]:
    """The parameters gradient clipping measures and scales: the model's, not the loss weights w_k.

    The w_k are bounded by the loss's clamp, and their gradient is large early on (about -2.15
    per branch at the start of a 200-class run, a norm of about 3.7 for three branches): counted
    in the norm, they alone would scale every early model step down to about 0.27x under
    ``clip_grad: 1.0``.
    """
    return [p for p in unwrap(module).model.parameters() if p.requires_grad]


def accumulation_windows(batches: Iterable, accumulation: int) -> Iterator[list]:
    """The micro-batches of each optimizer step: consecutive groups of ``accumulation``; the last
    group of a finite iterable may be shorter."""
    window: list = []
    for batch in batches:
        window.append(batch)
        if len(window) == accumulation:
            yield window
            window = []
    if window:
        yield window


def micro_step(
    module: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    amp_dtype: torch.dtype,
    window_size: int,
    ends_window: bool,
) -> LossResult:
    """Forward and backward of one micro-batch, its loss divided by the accumulation window.

    Under DDP, gradients are synchronised only on the micro-batch that ends the window.
    """
    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    no_sync = getattr(module, "no_sync", None)
    with no_sync() if no_sync is not None and not ends_window else contextlib.nullcontext():
        with autocast(device, amp_dtype):
            result = module(images, labels)
        scaler.scale(result.total / window_size).backward()
    return result


@dataclass
class WindowTotals:
    """What the micro-batches of one accumulation window add up to (device tensors, no host sync)."""

    branch_losses: torch.Tensor  # (micro-batches, branches): each micro-batch's unweighted losses
    loss_sum: torch.Tensor  # (1 + branches,): total and branch losses summed over the window's images
    correct: torch.Tensor  # (branches,): correct top-1 predictions per branch
    images: int


def accumulate_gradients(
    module: nn.Module,
    window: Sequence[tuple[torch.Tensor, torch.Tensor]],
    scaler: torch.amp.GradScaler,
    device: torch.device,
    amp_dtype: torch.dtype,
) -> WindowTotals:
    """Forward and backward of every micro-batch of one window, each loss divided by the window's size.

    Args:
        module: a ``ModelWithLoss``, possibly wrapped in DistributedDataParallel.
    """
    branches = unwrap(module).criterion.branches
    losses, loss_sum, correct, images = [], 0.0, 0.0, 0
    for i, (x, labels) in enumerate(window):
        result = micro_step(module, x, labels, scaler, device, amp_dtype, len(window), i + 1 == len(window))
        branch_losses = torch.stack([result.per_branch[b].detach() for b in branches])
        losses.append(branch_losses)
        loss_sum = loss_sum + torch.cat([result.total.detach().reshape(1), branch_losses]) * len(labels)
        correct = correct + torch.stack([result.correct[b] for b in branches])
        images += len(labels)
    return WindowTotals(torch.stack(losses), loss_sum, correct, images)


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    params: list[torch.Tensor],
    clip_grad: float | None,
    window_losses: torch.Tensor,
    branches: tuple[str, ...],
) -> str | None:
    """Clip ``params`` and step; or skip the step and return why (the non-finite branches or gradients).

    With fp16 loss scaling the scaler itself skips a step whose gradients overflowed and lowers
    the scale; that step did not happen either, so it is reported like any other skipped step
    (the caller counts it and applies the bad-step rule to it).
    """
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad else math.inf)
    # Every process must take the same decision, or their weights part ways: count the
    # non-finite branch losses over all processes.
    non_finite = all_reduce_sum((~torch.isfinite(window_losses)).any(dim=0).float())
    bad = [b for b, n in zip(branches, non_finite.tolist(), strict=True) if n > 0]  # one host sync
    if not bad and not scaler.is_enabled() and not math.isfinite(grad_norm.item()):
        bad = ["gradients"]
    if bad:
        optimizer.zero_grad(set_to_none=True)
        scaler.update()
        return ", ".join(bad)
    # GradScaler.step syncs with the host anyway (it reads whether any gradient overflowed).
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if scale is not None and scaler.get_scale() < scale:  # the scaler found inf/NaN gradients
        return f"gradients (fp16 overflow; loss scale {scale:g} -> {scaler.get_scale():g})"
    return None


def train_one_epoch(
    module: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    lr_for_step: Callable[[int], float],
    first_step: int,
    settings: StepSettings,
    bad_streak: int = 0,
    epoch: int = 0,
) -> EpochStats:
    """One pass over ``loader``; returns averages over the epoch (and over all processes).

    Args:
        module: a ``ModelWithLoss``, possibly wrapped in DistributedDataParallel.
        loader: micro-batches (images, labels); ``len(loader)`` of them.

    Raises:
        TrainingDiverged: ``settings.max_bad_steps`` optimizer steps in a row were not finite.
    """
    module.train()
    criterion = unwrap(module).criterion
    branches = criterion.branches
    params = clipped_parameters(module)
    steps = math.ceil(len(loader) / settings.accumulation)
    loss_sum = torch.zeros(len(branches) + 1, device=device)
    correct = torch.zeros(len(branches), device=device)
    images, step, skipped, lr = 0, first_step, 0, math.nan
    start = time.perf_counter()
    windows = accumulation_windows(loader, settings.accumulation)
    bar = tqdm(windows, total=steps, desc=f"epoch {epoch}", disable=not settings.show_progress, leave=False)
    optimizer.zero_grad(set_to_none=True)
    for window in bar:
        totals = accumulate_gradients(module, window, scaler, device, settings.amp_dtype)
        loss_sum, correct, images = (
            loss_sum + totals.loss_sum,
            correct + totals.correct,
            images + totals.images,
        )
        lr = lr_for_step(step)
        set_lr(optimizer, lr)
        reason = optimizer_step(optimizer, scaler, params, settings.clip_grad, totals.branch_losses, branches)
        criterion.project()
        step += 1
        bad_streak = 0 if reason is None else bad_streak + 1
        skipped += reason is not None
        if bad_streak >= settings.max_bad_steps:
            raise TrainingDiverged(
                f"{bad_streak} optimizer steps in a row were skipped because {reason} became non-finite "
                f"(last LR {lr:.3g}, epoch {epoch}, step {step})"
            )
        if settings.empty_cache_every and step % settings.empty_cache_every == 0:
            maybe_empty_cache(device)
        if settings.show_progress and (step % settings.log_every == 0 or step - first_step == steps):
            mean = (loss_sum / images).tolist()
            acc = 100.0 * correct[0].item() / images
            rate = images / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{mean[0]:.3f}", acc=f"{acc:.1f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
    bar.close()
    summed = all_reduce_sum(torch.cat([loss_sum, correct, torch.tensor([images], device=device)]))
    images = int(summed[-1])
    means = (summed[: len(branches) + 1] / max(images, 1)).tolist()
    accs = (100.0 * summed[len(branches) + 1 : -1] / max(images, 1)).tolist()
    return EpochStats(
        loss=means[0],
        branch_loss=dict(zip(branches, means[1:], strict=True)),
        branch_acc=dict(zip(branches, accs, strict=True)),
        images=images,
        steps=step - first_step,
        skipped_steps=skipped,
        bad_streak=bad_streak,
        lr=lr,
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    num_classes: int,
    modes: Sequence[str],
    amp_dtype: torch.dtype = torch.float32,
    tta: str = "none",
    show_progress: bool = False,
) -> Tally:
    """Count every inference mode's predictions on ``loader``; summed over all processes, each of
    which saw its own shard, so every image is counted once. ``metrics.summarize`` turns the
    tally into top-1 / top-5 / mean per-class accuracy.

    Args:
        model: a ``DualViT`` (put in eval mode here).
        modes: inference modes to count (``sa``, ``glca``, ``sa+glca``).
        tta: ``none`` or ``flip`` (probabilities averaged with the mirrored image).
    """
    model.eval()
    tally = Tally.zeros(num_classes, modes, device)
    for images, labels in tqdm(loader, desc="evaluate", disable=not show_progress, leave=False):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        probs, _ = class_probabilities(model, images, modes, tta, amp_dtype)
        for mode, scores in probs.items():
            tally.add(mode, scores, labels)
    for counts in tally.tensors():
        all_reduce_sum(counts)
    return tally
