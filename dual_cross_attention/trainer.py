"""The training run: build from a Config, loop over epochs, evaluate, checkpoint, resume exactly.

Every epoch starts by reseeding all RNGs from (seed, epoch), so an epoch is a pure function
of the state at its start. Resuming from the checkpoint written at an epoch boundary therefore
reproduces the uninterrupted run exactly (on the same machine and software).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .builders import TrainingParts, build_training, effective_batch, start_epoch
from .checkpoint import rng_states
from .config import Config
from .diagnostics.health import health_warnings
from .distributed import DistInfo, barrier, init_distributed
from .engine import EpochStats, StepSettings, TrainingDiverged, evaluate, train_one_epoch
from .evaluation.metrics import Summary, summarize
from .inference import available_modes
from .resume import Progress, keep_effective_batch, restore, resumable_state
from .run_io import (
    RunLock,
    RunRecorder,
    metrics_row,
    prepare_run_dir,
    read_history,
    save_checkpoints,
)
from .runtime import device_memory_mb, peak_memory_mb, reset_peak_memory, resolve_device, seed_everything

_logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    epochs_done: int  # epochs completed over the whole run
    best_metric: float
    history: list[dict[str, Any]]
    model: torch.nn.Module  # the trained DualViT (last epoch), e.g. to inspect in a notebook


def _checkpoint(
    parts: TrainingParts, progress: Progress, epoch: int, cfg: Config, world_size: int
) -> dict[str, Any]:
    modules = {"model": parts.model, "loss": parts.criterion, "optimizer": parts.optimizer}
    state = {key: module.state_dict() for key, module in modules.items()}
    state.update(
        scaler=parts.scaler.state_dict(),
        schedule=asdict(parts.schedule),
        epoch=epoch,
        global_step=progress.step,
        best_metric=progress.best,
        bad_streak=progress.bad_streak,
        initial_loss_weights=progress.initial_weights,
        config=cfg.to_dict(),
        classes=parts.data.classes,
        eval_split=parts.data.eval_split,
        rng=rng_states(),
        world_size=world_size,
    )
    return state


def _step_settings(cfg: Config, amp_dtype: torch.dtype, show_progress: bool) -> StepSettings:
    t = cfg.train
    return StepSettings(
        accumulation=t.gradient_accumulation_steps,
        clip_grad=t.clip_grad,
        max_bad_steps=t.max_bad_steps,
        empty_cache_every=t.empty_cache_every,
        log_every=cfg.run.log_every,
        amp_dtype=amp_dtype,
        show_progress=show_progress,
    )


def selection_metric(summary: Summary) -> float:
    """Top-1 of the paper's inference rule (sa+glca), or of SA for a model without GLCA."""
    return summary.metrics[summary.primary_mode]["top1"]


def selection_rule(eval_split: str, select_on_test: bool) -> str:
    """How best.pt is chosen: on validation accuracy when the run has a validation split; without
    one, the last epoch is kept (choosing on test accuracy would report a number picked on the
    data it measures) unless ``train.select_on_test`` asks for exactly that."""
    if eval_split == "val":
        return "val"
    return "test" if select_on_test else "last"


def train(cfg: Config, resume: str | None = None, show_progress: bool = True) -> RunResult:
    """Train (or continue) the run ``cfg.run.name``; returns where it lives and what it reached.

    Under torchrun every process runs this; only rank 0 writes logs, metrics and checkpoints.
    """
    dist = init_distributed(resolve_device(cfg.train.device))
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    lock = RunLock(run_dir)
    try:
        state, resume_path = resumable_state(cfg, resume, run_dir, dist, lock)
        adjusted = keep_effective_batch(cfg, state, resume_path, dist.world_size) if state else cfg
        prepare_run_dir(adjusted, run_dir, dist)
        if adjusted is not cfg:
            then = state.get("world_size", 1)
            _logger.warning(
                "resuming under %d process(es) instead of %d: train.gradient_accumulation_steps %d -> %d "
                "keeps the effective batch %d (and the LR schedule)", dist.world_size, then,
                cfg.train.gradient_accumulation_steps, adjusted.train.gradient_accumulation_steps,
                effective_batch(cfg.train, then),
            )  # fmt: skip
        cfg = adjusted
        parts = build_training(cfg, dist, resume_from=(state, resume_path) if state else None)
        if state is not None:
            progress = restore(state, resume_path, parts, cfg)
        else:
            initial = parts.criterion.raw_weights() if cfg.loss.weighting == "uncertainty" else {}
            progress = Progress(initial_weights=initial)
        recorder = None
        if dist.is_main:
            recorder = RunRecorder(run_dir, read_history(run_dir / "metrics.csv", progress.next_epoch - 1),
                                   cfg.run.tensorboard, cfg.run.wandb_project if cfg.run.wandb else None,
                                   cfg.to_dict())  # fmt: skip
        try:
            progress = _run_epochs(cfg, parts, progress, recorder, dist, run_dir, show_progress)
        finally:
            if recorder is not None:
                recorder.close()
        barrier()  # no process leaves while rank 0 still writes the last checkpoint
    finally:
        lock.release()
    return RunResult(
        run_dir=run_dir,
        epochs_done=progress.next_epoch,
        best_metric=progress.best,
        history=recorder.history if recorder is not None else [],
        model=parts.model,
    )


def _run_epochs(
    cfg: Config,
    parts: TrainingParts,
    progress: Progress,
    recorder: RunRecorder | None,
    dist: DistInfo,
    run_dir: Path,
    show_progress: bool,
) -> Progress:
    """The epochs left to train in this invocation: train, evaluate, record, checkpoint."""
    t = cfg.train
    settings = _step_settings(cfg, parts.amp_dtype, show_progress and dist.is_main)
    modes = available_modes(parts.model)
    num_classes = len(parts.data.classes)
    rule = selection_rule(parts.data.eval_split, t.select_on_test)
    _logger.info("best.pt: %s", SELECTION_TEXT[rule])
    stop = t.epochs if cfg.run.stop_after_epochs is None else progress.next_epoch + cfg.run.stop_after_epochs
    for epoch in range(progress.next_epoch, min(t.epochs, stop)):
        try:
            stats = _train_epoch(parts, settings, progress, epoch, cfg, dist.rank, run_dir / "checkpoints")
        except KeyboardInterrupt:
            _logger.warning("interrupted in epoch %d: last.pt holds epoch %d", epoch, epoch - 1)
            raise
        tally = evaluate(parts.model, parts.eval_loader, parts.device, num_classes, modes, parts.amp_dtype)
        summary = summarize(tally, parts.data.classes)
        metric = selection_metric(summary)
        is_best = rule == "last" or metric > progress.best
        progress = replace(
            progress,
            next_epoch=epoch + 1,
            step=progress.step + stats.steps,
            best=metric if is_best else progress.best,
            bad_streak=stats.bad_streak,
        )
        if recorder is None:
            continue
        row = metrics_row(epoch, stats, summary, parts.criterion.raw_weights(), peak_memory_mb(parts.device))
        recorder.record(row, parts.data.eval_split)
        device_mb = device_memory_mb(parts.device)
        for message in health_warnings(
            recorder.history, num_classes, t.warmup_epochs, progress.initial_weights, device_mb
        ):
            _logger.warning("health: %s", message)
        state = _checkpoint(parts, progress, epoch, cfg, dist.world_size)
        save_checkpoints(state, run_dir / "checkpoints", is_best, t.checkpoint_every, t.keep_checkpoints)
    return progress


SELECTION_TEXT = {
    "val": "the epoch with the best validation top-1 (data.val_fraction carves the validation split)",
    "last": "the last epoch: the run has no validation split (set data.val_fraction > 0 to select on one)",
    "test": "the epoch with the best TEST top-1 (train.select_on_test: true): the best is picked on test",
}


def _train_epoch(
    parts: TrainingParts,
    settings: StepSettings,
    progress: Progress,
    epoch: int,
    cfg: Config,
    rank: int,
    checkpoint_dir: Path,
) -> EpochStats:
    """Reseed from (seed, epoch), then one epoch of training; a divergence names the last good checkpoint."""
    epoch_seed = cfg.train.seed * 1_000_003 + epoch
    seed_everything(epoch_seed + 7_919 * rank)  # distinct masks and pairs per process
    start_epoch(parts.train_loader, epoch, epoch_seed)
    reset_peak_memory(parts.device)
    try:
        return train_one_epoch(
            parts.step_module, parts.train_loader, parts.optimizer, parts.scaler, parts.device,
            parts.schedule, progress.step, settings, bad_streak=progress.bad_streak, epoch=epoch,
        )  # fmt: skip
    except TrainingDiverged as err:
        last_good = checkpoint_dir / "last.pt"
        where = f"the last good checkpoint is {last_good}" if last_good.exists() else "no checkpoint yet"
        raise TrainingDiverged(f"{err}; {where} (left untouched)") from err
