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
from .errors import UsageError
from .evaluation.metrics import Summary, summarize
from .evaluation.reid import ReIDSummary, evaluate_reid, reid_protocol
from .inference import available_modes
from .provenance import (
    UNKNOWN,
    fgvc_protocol,
    file_sha256,
    format_provenance,
    provenance,
    selection,
    write_run_provenance,
)
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
from .verification.run_pairs import RunPairs, score_validation, training_pairs
from .verification.scoring import PairEvaluation

_logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    epochs_done: int  # epochs completed over the whole run
    best_metric: float
    history: list[dict[str, Any]]
    model: torch.nn.Module  # the trained DualViT (last epoch), e.g. to inspect in a notebook


def _checkpoint(
    parts: TrainingParts,
    progress: Progress,
    epoch: int,
    cfg: Config,
    world_size: int,
    verification: dict[str, Any] | None = None,
    selected: bool = False,
    record: dict[str, Any] | None = None,
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
        selected=selected,  # this epoch is the one best.pt's rule chose (so far)
        provenance=record or {},
    )
    if verification is not None:  # the decision thresholds chosen on the validation pairs, per mode
        state["verification"] = verification
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


def selection_metric(
    summary: Summary | ReIDSummary, select: str = "auto", pairs: PairEvaluation | None = None
) -> float:
    """best.pt's criterion (``train.select_metric``) on the paper's inference rule (sa+glca), or on SA
    for a model without GLCA: top-1 (FGVC; Re-ID: mAP) for ``auto``, top-1 (Re-ID: CMC rank-1) for
    ``top1``, mAP, or ``auc``: the ROC AUC of the validation pairs."""
    mode = summary.primary_mode
    if select == "auc":
        if pairs is None:
            raise UsageError("train.select_metric: auc needs validation pairs (data.val_fraction > 0, Re-ID)")
        return pairs.results[mode].auc
    if isinstance(summary, ReIDSummary):
        return summary.metrics[mode]["rank1" if select == "top1" else "mAP"]
    return summary.metrics[mode]["top1"]


def _evaluate_epoch(
    parts: TrainingParts, cfg: Config, modes: tuple[str, ...], val_pairs: RunPairs | None = None
) -> tuple[Summary | ReIDSummary, PairEvaluation | None]:
    """The per-epoch evaluation: top-1 on the selection split, or for Re-ID the query/gallery ranking
    and, with ``val_pairs``, those pairs scored on the very embeddings the ranking used."""
    if parts.gallery_loader is not None:
        summary = evaluate_reid(
            parts.model, parts.eval_loader, parts.gallery_loader, parts.device, modes, parts.amp_dtype,
            cfg.reid.distance, cfg.reid.rerank, keep_features=val_pairs is not None, tta=cfg.eval.tta,
        )  # fmt: skip
        if val_pairs is None:
            return summary, None
        pairs = score_validation(
            summary.features, parts.data, cfg.data.root, val_pairs, cfg.verification.far_targets
        )
        summary.features = {}  # scored: no need to hold them until the next epoch
        return summary, pairs
    tally = evaluate(
        parts.model, parts.eval_loader, parts.device, len(parts.data.classes), modes, parts.amp_dtype,
        cfg.eval.tta,
    )  # fmt: skip
    return summarize(tally, parts.data.classes), None


def run_provenance(cfg: Config, parts: TrainingParts, world_size: int, resumed_from: Path | None) -> dict:
    """The run's provenance record (``provenance``): the protocol and TTA of its per-epoch evaluation,
    how best.pt is chosen, and the checkpoint it started from (``model.init_from``) or resumed."""
    data = parts.data
    reid = data.reid is not None
    protocol = (
        reid_protocol(data.eval, cfg.reid.distance, cfg.reid.rerank)
        if reid
        else fgvc_protocol(data.eval_split)
    )
    t = cfg.train
    record = provenance(
        cfg, parts.device, dataset_version=data.reid.version if reid else "", protocol=protocol,
        tta=cfg.eval.tta, chosen=selection(data.eval_split, t.select_on_test, t.select_metric, reid),
        world_size=world_size,
    )  # fmt: skip
    init = cfg.model.init_from
    # On a resume the file may be gone: its weights are in the checkpoint, its hash in "earlier".
    digest = file_sha256(init) if init is not None and Path(init).is_file() else UNKNOWN
    record["init_from"] = None if init is None else {"path": init, "sha256": digest}
    record["resumed_from"] = None if resumed_from is None else str(resumed_from)
    return record


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
        record = run_provenance(cfg, parts, dist.world_size, resume_path) if dist.is_main else {}
        if dist.is_main:
            path = write_run_provenance(run_dir, record, resumed=state is not None)
            _logger.info("provenance (%s): %s", path.name, " | ".join(format_provenance(record)))
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
            progress = _run_epochs(cfg, parts, progress, recorder, dist, run_dir, show_progress, record)
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
    record: dict[str, Any],
) -> Progress:
    """The epochs left to train in this invocation: train, evaluate, record, checkpoint.

    Args:
        record: the run's provenance, stored in each checkpoint (empty on ranks other than 0).
    """
    t = cfg.train
    settings = _step_settings(cfg, parts.amp_dtype, show_progress and dist.is_main)
    modes = available_modes(parts.model)
    num_classes = len(parts.data.classes)
    chosen = selection(
        parts.data.eval_split, t.select_on_test, t.select_metric, parts.gallery_loader is not None
    )
    rule = chosen["rule"]
    _logger.info("best.pt: %s", chosen["text"])
    val_pairs = training_pairs(cfg, parts.data, run_dir, write=dist.is_main)
    stop = t.epochs if cfg.run.stop_after_epochs is None else progress.next_epoch + cfg.run.stop_after_epochs
    for epoch in range(progress.next_epoch, min(t.epochs, stop)):
        try:
            stats = _train_epoch(parts, settings, progress, epoch, cfg, dist.rank, run_dir / "checkpoints")
        except KeyboardInterrupt:
            _logger.warning("interrupted in epoch %d: last.pt holds epoch %d", epoch, epoch - 1)
            raise
        summary, pairs = _evaluate_epoch(parts, cfg, modes, val_pairs)
        metric = selection_metric(summary, t.select_metric, pairs)
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
        verification = None
        if pairs is not None:
            row.update(pairs.columns())
            verification = {"thresholds": pairs.thresholds, "pairs": str(val_pairs.path)}
        recorder.record(row, parts.data.eval_split)
        if pairs is not None:
            _logger.info("epoch %d: validation pairs %s", epoch, pairs.summary_line())
        device_mb = device_memory_mb(parts.device)
        for message in health_warnings(
            recorder.history, num_classes, t.warmup_epochs, progress.initial_weights, device_mb
        ):
            _logger.warning("health: %s", message)
        state = _checkpoint(parts, progress, epoch, cfg, dist.world_size, verification, is_best, record)
        save_checkpoints(state, run_dir / "checkpoints", is_best, t.checkpoint_every, t.keep_checkpoints)
    return progress


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
