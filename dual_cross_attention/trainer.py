"""The training run: build from a Config, loop over epochs, evaluate, checkpoint, resume exactly.

Every epoch starts by reseeding all RNGs from (seed, epoch), so an epoch is a pure function
of the state at its start. Resuming from the checkpoint written at an epoch boundary therefore
reproduces the uninterrupted run exactly (on the same machine and software).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .builders import TrainingParts, build_training, start_epoch
from .checkpoint import CheckpointError, load_checkpoint, restore_rng_states, rng_states
from .config import Config
from .diagnostics.health import health_warnings
from .distributed import DistInfo, barrier, broadcast_from_main, gather_from_all, init_distributed
from .engine import EpochStats, StepSettings, TrainingDiverged, evaluate, train_one_epoch
from .evaluation.metrics import Summary, summarize
from .run_io import RunRecorder, metrics_row, prepare_run_dir, read_history, save_checkpoints
from .runtime import device_memory_mb, peak_memory_mb, reset_peak_memory, resolve_device, seed_everything

_logger = logging.getLogger(__name__)

# Keys a resumed run may change; any other difference would make the resumed run a different
# experiment than the one in the checkpoint.
RESUME_MAY_CHANGE = {
    "train.epochs",
    "train.empty_cache_every",
    "train.max_bad_steps",
    "train.device",
    "train.precision",  # weights are fp32; only the autocast dtype (and loss scaling) changes
    "data.root",
    "data.num_workers",
    "data.eval_batch_size",
    "model.grad_checkpointing",
    "model.pretrained",
    "model.pretrained_path",
}


class RunExistsError(RuntimeError):
    """The run directory already holds a run and no --resume was given."""


@dataclass
class RunResult:
    run_dir: Path
    epochs_done: int  # epochs completed over the whole run
    best_metric: float
    history: list[dict[str, Any]]
    model: torch.nn.Module  # the trained DualViT (last epoch), e.g. to inspect in a notebook


@dataclass
class Progress:
    """Where a run stands at an epoch boundary: what a checkpoint restores besides the states."""

    next_epoch: int = 0
    step: int = 0
    best: float = -math.inf
    bad_streak: int = 0
    initial_weights: dict[str, float] = field(default_factory=dict)


def _flatten(raw: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in raw.items() for key, value in values.items()}


def check_resume_compatible(cfg: Config, saved: dict[str, Any], path: Path) -> None:
    now, then = _flatten(cfg.to_dict()), _flatten(saved)
    changed = sorted(
        k
        for k in now
        if now[k] != then.get(k) and k not in RESUME_MAY_CHANGE and not k.startswith(("run.", "lr_find."))
    )
    if changed:
        diffs = ", ".join(f"{k}: {then.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ValueError(
            f"cannot resume {path}: the config differs in {diffs}. These change the experiment; start a new "
            f"run with --set run.name=<new name>, or drop the overrides. Resumable changes: "
            f"{sorted(RESUME_MAY_CHANGE)}."
        )


def resolve_resume(resume: str | None, checkpoint_dir: Path) -> Path | None:
    """``auto``: last.pt of this run if it exists (else start fresh); a path: that file."""
    last = checkpoint_dir / "last.pt"
    if resume is None:
        if last.exists():
            raise RunExistsError(
                f"{checkpoint_dir.parent} already holds a run ({last}). Continue it with --resume auto, or "
                "start another with --set run.name=<new name>."
            )
        return None
    if resume == "auto":
        if last.exists():
            return last
        _logger.info("--resume auto: no %s yet, starting a new run", last)
        return None
    return Path(resume)


def _resumable_state(
    cfg: Config, resume: str | None, run_dir: Path, dist: DistInfo
) -> tuple[dict[str, Any] | None, Path | None]:
    """The checkpoint to resume from, checked against ``cfg``.

    Rank 0 decides (whether this run exists, which file to continue) and every process follows
    that decision; a process that cannot read the chosen file stops the run on every process,
    rather than training on from fresh weights while the others resume.
    """
    decision: Path | str | None
    try:
        decision = resolve_resume(resume, run_dir / "checkpoints") if dist.is_main else None
    except RunExistsError as err:
        decision = str(err)
    decision = broadcast_from_main(decision)
    if isinstance(decision, str):
        raise RunExistsError(decision)
    if decision is None:
        return None, None
    missing = [rank for rank, readable in enumerate(gather_from_all(decision.is_file())) if not readable]
    if missing and 0 not in missing:  # (rank 0 not reading it either: load_checkpoint says why)
        raise CheckpointError(
            f"rank 0 resumes from {decision}, which process(es) of rank {missing} cannot read: resuming a "
            "multi-node run needs the run folder (run.output_dir) on a file system every node shares, or a "
            "copy of the checkpoint at that path on every node"
        )
    state = load_checkpoint(decision)
    check_resume_compatible(cfg, state["config"], decision)
    return state, decision


def _restore(state: dict[str, Any], path: Path, parts: TrainingParts, cfg: Config) -> Progress:
    """Optimizer, loss scaler and RNG states, and where the run stood (``build_training`` has
    already loaded the model and loss weights, before DDP wrapped them)."""
    parts.optimizer.load_state_dict(state["optimizer"])
    if parts.scaler.is_enabled() and not state["scaler"]:
        _logger.info("loss scaling starts afresh: %s was trained without fp16", path)
    else:
        parts.scaler.load_state_dict(state["scaler"])  # a no-op for a disabled scaler (not fp16 now)
    restore_rng_states(state["rng"])
    old_epochs = state["config"]["train"]["epochs"]
    if old_epochs != cfg.train.epochs:
        _logger.info(
            "train.epochs changed %d -> %d: the cosine schedule is rebuilt for %d total optimizer steps",
            old_epochs, cfg.train.epochs, parts.schedule.total_steps,
        )  # fmt: skip
    progress = Progress(
        next_epoch=state["epoch"] + 1,
        step=state["global_step"],
        best=state["best_metric"],
        bad_streak=state["bad_streak"],
        initial_weights=state["initial_loss_weights"],
    )
    _logger.info("resumed from %s at epoch %d (step %d)", path, progress.next_epoch, progress.step)
    return progress


def _checkpoint(parts: TrainingParts, progress: Progress, epoch: int, cfg: Config) -> dict[str, Any]:
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


def train(cfg: Config, resume: str | None = None, show_progress: bool = True) -> RunResult:
    """Train (or continue) the run ``cfg.run.name``; returns where it lives and what it reached.

    Under torchrun every process runs this; only rank 0 writes logs, metrics and checkpoints.
    """
    dist = init_distributed(resolve_device(cfg.train.device))
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    state, resume_path = _resumable_state(cfg, resume, run_dir, dist)
    prepare_run_dir(cfg, run_dir, dist)
    t, parts = cfg.train, build_training(cfg, dist, resume_from=(state, resume_path) if state else None)
    if state is not None:
        progress = _restore(state, resume_path, parts, cfg)
    else:
        initial = parts.criterion.raw_weights() if cfg.loss.weighting == "uncertainty" else {}
        progress = Progress(initial_weights=initial)
    recorder = None
    if dist.is_main:
        history = read_history(run_dir / "metrics.csv", progress.next_epoch - 1)
        recorder = RunRecorder(run_dir, history, cfg.run.tensorboard)
    settings = _step_settings(cfg, parts.amp_dtype, show_progress and dist.is_main)
    modes = ("sa", "glca", "sa+glca") if cfg.model.glca else ("sa",)
    num_classes = len(parts.data.classes)
    stop = t.epochs if cfg.run.stop_after_epochs is None else progress.next_epoch + cfg.run.stop_after_epochs
    for epoch in range(progress.next_epoch, min(t.epochs, stop)):
        stats = _train_epoch(parts, settings, progress, epoch, cfg, dist.rank, run_dir / "checkpoints")
        tally = evaluate(parts.model, parts.eval_loader, parts.device, num_classes, modes, parts.amp_dtype)
        summary = summarize(tally, parts.data.classes)
        metric = selection_metric(summary)
        is_best = metric > progress.best
        progress = replace(
            progress,
            next_epoch=epoch + 1,
            step=progress.step + stats.steps,
            best=max(progress.best, metric),
            bad_streak=stats.bad_streak,
        )
        if recorder is None:
            continue
        weights = parts.criterion.raw_weights()
        row = metrics_row(epoch, stats, summary, weights, peak_memory_mb(parts.device))
        recorder.record(row, parts.data.eval_split)
        device_mb = device_memory_mb(parts.device)
        for message in health_warnings(
            recorder.history, num_classes, t.warmup_epochs, progress.initial_weights, device_mb
        ):
            _logger.warning("health: %s", message)
        save_checkpoints(_checkpoint(parts, progress, epoch, cfg), run_dir / "checkpoints", is_best)
    if recorder is not None:
        recorder.close()
    barrier()  # no process leaves while rank 0 still writes the last checkpoint
    return RunResult(
        run_dir=run_dir,
        epochs_done=progress.next_epoch,
        best_metric=progress.best,
        history=recorder.history if recorder is not None else [],
        model=parts.model,
    )


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
