"""Continuing a run: which checkpoint, whether it may be continued, and restoring its state.

Rank 0 decides what to resume and every process follows; the saved config is compared with
the new one key by key (only ``RESUME_MAY_CHANGE`` may differ); a run resumed under another
number of processes keeps its effective batch, so its LR schedule continues unchanged.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .builders import TrainingParts, effective_batch
from .checkpoint import CheckpointError, load_checkpoint, restore_rng_states
from .config import Config, from_dict
from .distributed import DistInfo, broadcast_from_main, gather_from_all
from .errors import DcalError, UsageError
from .run_io import RunInUseError, RunLock

_logger = logging.getLogger(__name__)

NOT_THE_EXPERIMENT = ("run.", "lr_find.", "ablation.")  # sections about how a run is driven
# Keys a resumed run may change; any other difference would make the resumed run a different
# experiment than the one in the checkpoint. Deliberately absent: ``eval.tta`` (it changes the
# metric best.pt is selected on, so epochs before and after would not compare) and
# ``model.init_from`` (the weights the run started from; see ``check_init_from``).
RESUME_MAY_CHANGE = {
    "train.epochs",
    "train.empty_cache_every",
    "train.max_bad_steps",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.device",
    "train.precision",  # weights are fp32; only the autocast dtype (and loss scaling) changes
    "data.root",
    "data.num_workers",
    "data.eval_batch_size",
    "model.grad_checkpointing",
    "model.pretrained",
    "model.pretrained_path",
}


class RunExistsError(DcalError, RuntimeError):
    """The run directory already holds a run and no --resume was given."""


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
    """Refuse a resume whose config changes the experiment. The saved config is read through the
    schema first, so a key added since the checkpoint was written counts at its default."""
    now = _flatten(cfg.to_dict())
    then = _flatten(from_dict(saved, source=f"config stored in {path}").to_dict())
    changed = sorted(
        k
        for k in now
        if now[k] != then.get(k) and k not in RESUME_MAY_CHANGE and not k.startswith(NOT_THE_EXPERIMENT)
    )
    if changed:
        diffs = ", ".join(f"{k}: {then.get(k)!r} -> {now[k]!r}" for k in changed)
        raise UsageError(
            f"cannot resume {path}: the config differs in {diffs}. These change the experiment; start a new "
            f"run with --set run.name=<new name>, or drop the overrides. Resumable changes: "
            f"{sorted(RESUME_MAY_CHANGE)}."
        )


def check_init_from(cfg: Config, saved: dict[str, Any], path: Path) -> None:
    """Refuse ``model.init_from`` on a resume that did not start from it: the resumed checkpoint's
    weights would silently win over the ones asked for. Resuming a run that was itself started
    from ``init_from`` (the same value) is fine: those weights are in the checkpoint already."""
    wanted = cfg.model.init_from
    then = saved.get("model", {}).get("init_from")
    if wanted is None or wanted == then:
        if wanted is not None:
            _logger.info(
                "model.init_from %s was applied when this run started; continuing from %s", wanted, path
            )
        return
    raise UsageError(
        f"both --resume ({path}) and model.init_from ({wanted}) apply: a resumed run continues from its "
        f"checkpoint's weights (which started from {then or 'no init_from'}), so model.init_from would be "
        "ignored. Drop --resume and start a new run (--set run.name=<new name>) to fine-tune from "
        f"{wanted}, or continue {path} with model.init_from as it started: {then or 'null'}."
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


def resumable_state(
    cfg: Config, resume: str | None, run_dir: Path, dist: DistInfo, lock: RunLock
) -> tuple[dict[str, Any] | None, Path | None]:
    """Lock the run directory and find the checkpoint to resume from, checked against ``cfg``.

    Rank 0 decides (whether the run is free, whether it exists, which file to continue) and
    every process follows that decision; a process that cannot read the chosen file stops the
    run on every process, rather than training on from fresh weights while the others resume.
    """
    decision: Path | DcalError | None = None
    if dist.is_main:
        try:
            lock.acquire()
            decision = resolve_resume(resume, run_dir / "checkpoints")
        except (RunExistsError, RunInUseError) as err:
            decision = err
    decision = broadcast_from_main(decision)
    if isinstance(decision, DcalError):
        raise decision
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
    check_init_from(cfg, state["config"], decision)
    check_resume_compatible(cfg, state["config"], decision)
    return state, decision


def keep_effective_batch(cfg: Config, state: dict[str, Any], path: Path, world_size: int) -> Config:
    """The config to resume with under ``world_size`` processes: the effective batch of the
    checkpoint (and so the LR schedule) is kept by adjusting gradient accumulation, or, where no
    whole number of micro-batches gives it, the resume is refused with what would."""
    t, then = cfg.train, state.get("world_size", 1)
    before = effective_batch(t, then)
    now = effective_batch(t, world_size)
    if now == before:
        return cfg
    per_step = t.batch_size * world_size
    if before % per_step:
        raise UsageError(
            f"cannot resume {path} under {world_size} process(es): it was trained with effective batch "
            f"{before} = {t.batch_size} x {t.gradient_accumulation_steps} accumulation x {then} processes, "
            f"and {t.batch_size} x {world_size} processes does not divide it, so the LR schedule would "
            f"change. Resume with a number of processes that divides {before // t.batch_size}."
        )
    accumulation = before // per_step
    return replace(cfg, train=replace(t, gradient_accumulation_steps=accumulation))


def restore(state: dict[str, Any], path: Path, parts: TrainingParts, cfg: Config) -> Progress:
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
