"""The two loops: ``train_one_epoch`` and ``evaluate``.

Gradient accumulation is done in the open: each micro-batch loss is divided by the size of
its accumulation window (the last window of an epoch may be shorter), and the LR is set from
the optimizer-step counter right before each step. Values are moved to the host only once
per optimizer step (the finiteness check) and at log time.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from .distributed import all_reduce_sum
from .losses import LossResult
from .models.dual_vit import PREDICT_MODES, combine_probabilities
from .optim import set_lr
from .runtime import autocast, maybe_empty_cache


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return getattr(module, "module", module)


class TrainingDiverged(RuntimeError):
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


@dataclass
class EvalResult:
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # mode -> top1/top5/mean_class (%)
    num_images: int = 0


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    params: list[torch.Tensor],
    clip_grad: float | None,
    window_losses: torch.Tensor,
    branches: tuple[str, ...],
) -> str | None:
    """Clip and step; or skip the step and return why (the non-finite branches or gradients).

    With fp16 loss scaling an overflowing gradient is routine and handled by the scaler, so only
    a non-finite loss counts as bad there.
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
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return None


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

    Raises:
        TrainingDiverged: ``settings.max_bad_steps`` optimizer steps in a row were not finite.
    """
    module.train()
    criterion = unwrap(module).criterion
    branches = criterion.branches
    params = [p for group in optimizer.param_groups for p in group["params"]]
    n_micro, accum = len(loader), settings.accumulation
    loss_sum = torch.zeros(len(branches) + 1, device=device)
    correct = torch.zeros(len(branches), device=device)
    images_seen, step, skipped, lr, window = 0, first_step, 0, float("nan"), []
    start = time.perf_counter()
    bar = tqdm(loader, total=n_micro, desc=f"epoch {epoch}", disable=not settings.show_progress, leave=False)
    optimizer.zero_grad(set_to_none=True)
    for i, (images, labels) in enumerate(bar):
        window_start = i - i % accum
        window_size = min(accum, n_micro - window_start)
        last_micro = i + 1 == window_start + window_size
        result = micro_step(
            module, images, labels, scaler, device, settings.amp_dtype, window_size, last_micro
        )
        branch_losses = torch.stack([result.per_branch[b].detach() for b in branches])
        window.append(branch_losses)
        loss_sum += torch.cat([result.total.detach().reshape(1), branch_losses]) * len(labels)
        correct += torch.stack([result.correct[b] for b in branches])
        images_seen += len(labels)
        if not last_micro:
            continue
        lr = lr_for_step(step)
        set_lr(optimizer, lr)
        reason = optimizer_step(optimizer, scaler, params, settings.clip_grad, torch.stack(window), branches)
        criterion.project()
        window, step = [], step + 1
        if reason is None:
            bad_streak = 0
        else:
            skipped, bad_streak = skipped + 1, bad_streak + 1
            if bad_streak >= settings.max_bad_steps:
                raise TrainingDiverged(
                    f"{bad_streak} optimizer steps in a row were skipped because {reason} became non-finite "
                    f"(last LR {lr:.3g}, epoch {epoch}, step {step})"
                )
        if settings.empty_cache_every and step % settings.empty_cache_every == 0:
            maybe_empty_cache(device)
        if settings.show_progress and (step % settings.log_every == 0 or i + 1 == n_micro):
            mean = (loss_sum / images_seen).tolist()
            rate = images_seen / (time.perf_counter() - start)
            acc = 100.0 * correct[0].item() / images_seen
            bar.set_postfix(loss=f"{mean[0]:.3f}", acc=f"{acc:.1f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
    bar.close()
    totals = all_reduce_sum(torch.cat([loss_sum, correct, torch.tensor([images_seen], device=device)]))
    loss_sum, correct, images_seen = (
        totals[: len(branches) + 1],
        totals[len(branches) + 1 : -1],
        int(totals[-1]),
    )
    means = (loss_sum / max(images_seen, 1)).tolist()
    accs = (100.0 * correct / max(images_seen, 1)).tolist()
    return EpochStats(
        loss=means[0],
        branch_loss=dict(zip(branches, means[1:], strict=True)),
        branch_acc=dict(zip(branches, accs, strict=True)),
        images=images_seen,
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
    amp_dtype: torch.dtype = torch.float32,
    modes: tuple[str, ...] = PREDICT_MODES,
    show_progress: bool = False,
) -> EvalResult:
    """Top-1, top-5 and mean per-class accuracy (percent) for each inference mode."""
    model.eval()
    k = min(5, num_classes)
    top1 = {m: torch.zeros((), device=device) for m in modes}
    top5 = {m: torch.zeros((), device=device) for m in modes}
    class_correct = {m: torch.zeros(num_classes, device=device) for m in modes}
    class_total = torch.zeros(num_classes, device=device)
    for images, labels in tqdm(loader, desc="eval", disable=not show_progress, leave=False):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            out = model(images)
        class_total += torch.bincount(labels, minlength=num_classes)
        for mode in modes:
            ranked = combine_probabilities(out, mode).topk(k, dim=-1).indices  # (B, k)
            hit1 = ranked[:, 0] == labels
            top1[mode] += hit1.sum()
            top5[mode] += (ranked == labels[:, None]).any(dim=1).sum()
            class_correct[mode] += torch.bincount(labels[hit1], minlength=num_classes)
    for counter in [class_total, *top1.values(), *top5.values(), *class_correct.values()]:
        all_reduce_sum(counter)  # each process saw its own shard: every image is counted once
    n = int(class_total.sum().item())
    present = class_total > 0
    result = EvalResult(num_images=n)
    for mode in modes:
        per_class = class_correct[mode][present] / class_total[present]
        result.metrics[mode] = {
            "top1": 100.0 * top1[mode].item() / max(n, 1),
            "top5": 100.0 * top5[mode].item() / max(n, 1),
            "mean_class": 100.0 * per_class.mean().item() if n else 0.0,
        }
    return result
