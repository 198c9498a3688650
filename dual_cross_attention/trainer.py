"""The training run: build from a Config, loop over epochs, log, checkpoint, resume exactly.

Every epoch starts by reseeding all RNGs from (seed, epoch), so an epoch is a pure function
of the state at its start. Resuming from the checkpoint written at an epoch boundary therefore
reproduces the uninterrupted run exactly (on the same machine and software).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .builders import DataBundle, build_training, start_epoch
from .checkpoint import load_checkpoint, restore_rng_states, rng_states, save_checkpoint
from .config import Config, from_dict
from .distributed import DistInfo, barrier, init_distributed
from .engine import EvalResult, StepSettings, TrainingDiverged, evaluate, train_one_epoch
from .health import health_warnings
from .optim import Schedule
from .runtime import (
    peak_memory_mb,
    reset_peak_memory,
    resolve_device,
    seed_everything,
)
from .visualize import plot_metrics

_logger = logging.getLogger(__name__)

# Keys a resumed run may change; any other difference would make the resumed run a different
# experiment than the one in the checkpoint.
RESUME_MAY_CHANGE = {
    "train.epochs",
    "train.empty_cache_every",
    "train.max_bad_steps",
    "train.device",
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


def _metrics_row(
    epoch: int, stats, evaluation: EvalResult, weights: dict[str, float], peak_mb: float
) -> dict:
    row: dict[str, Any] = {"epoch": epoch, "lr": stats.lr, "train_loss": stats.loss}
    for b in ("sa", "glca", "pwca"):
        row[f"train_loss_{b}"] = stats.branch_loss.get(b, math.nan)
        row[f"train_acc_{b}"] = stats.branch_acc.get(b, math.nan)
        row[f"weight_{b}"] = weights.get(b, math.nan)
    for mode, column in (
        ("sa", "eval_top1_sa"),
        ("glca", "eval_top1_glca"),
        ("sa+glca", "eval_top1_sa_glca"),
    ):
        row[column] = evaluation.metrics.get(mode, {}).get("top1", math.nan)
    row.update(
        eval_images=evaluation.num_images,
        skipped_steps=stats.skipped_steps,
        epoch_time_s=stats.seconds,
        peak_mem_mb=peak_mb,
    )
    return row


def _selection_metric(evaluation: EvalResult) -> float:
    metrics = evaluation.metrics
    return metrics["sa+glca"]["top1"] if "sa+glca" in metrics else metrics["sa"]["top1"]


def _read_history(csv: Path, upto_epoch: int) -> list[dict[str, Any]]:
    """Rows of an existing metrics.csv up to the resumed epoch (later rows belong to lost work)."""
    if not csv.exists():
        return []
    frame = pd.read_csv(csv)
    return frame[frame["epoch"] <= upto_epoch].to_dict("records")


@dataclass
class Progress:
    """Where a run stands at an epoch boundary: what a checkpoint restores besides the states."""

    next_epoch: int = 0
    step: int = 0
    best: float = -math.inf
    bad_streak: int = 0
    initial_weights: dict[str, float] = field(default_factory=dict)


def _restore(
    state: dict[str, Any], path: Path, modules: dict[str, Any], schedule: Schedule, epochs: int
) -> Progress:
    for key, module in modules.items():
        module.load_state_dict(state[key])
    restore_rng_states(state["rng"])
    old_epochs = state["config"]["train"]["epochs"]
    if old_epochs != epochs:
        _logger.info(
            "train.epochs changed %d -> %d: the cosine schedule is rebuilt for %d total optimizer steps",
            old_epochs, epochs, schedule.total_steps,
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


def _open_run(
    cfg: Config, resume: str | None, dist: DistInfo
) -> tuple[Path, dict[str, Any] | None, Path | None]:
    """Run directory, and the checkpoint state to resume from (every process reads the same file)."""
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    resume_path = resolve_resume(resume, run_dir / "checkpoints")
    state = load_checkpoint(resume_path) if resume_path else None
    if state is not None:
        check_resume_compatible(cfg, state["config"], resume_path)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _attach_log_file(run_dir / "train.log")
        _logger.info("resolved config:\n%s", cfg.to_yaml())
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    else:
        logging.getLogger("dual_cross_attention").setLevel(logging.WARNING)  # rank 0 speaks for all
    return run_dir, state, resume_path


def train(cfg: Config, resume: str | None = None, show_progress: bool = True) -> RunResult:
    """Train (or continue) the run ``cfg.run.name``; returns where it lives and what it reached.

    Under torchrun every process runs this; only rank 0 writes logs, metrics and checkpoints.
    """
    dist = init_distributed(resolve_device(cfg.train.device))
    run_dir, state, resume_path = _open_run(cfg, resume, dist)
    ckpt_dir = run_dir / "checkpoints"
    t, parts = cfg.train, build_training(cfg, dist)
    data, model, criterion = parts.data, parts.model, parts.criterion
    if state is not None and list(state["classes"]) != data.classes:
        raise ValueError(f"cannot resume {resume_path}: the dataset's classes differ from the checkpoint's")
    modules = {"model": model, "loss": criterion, "optimizer": parts.optimizer, "scaler": parts.scaler}
    if state is not None:
        progress = _restore(state, resume_path, modules, parts.schedule, t.epochs)
    else:
        initial = criterion.raw_weights() if cfg.loss.weighting == "uncertainty" else {}
        progress = Progress(initial_weights=initial)
    history = _read_history(run_dir / "metrics.csv", progress.next_epoch - 1) if dist.is_main else []
    writer = _tensorboard(run_dir) if cfg.run.tensorboard and dist.is_main else None
    settings = _step_settings(cfg, parts.amp_dtype, show_progress and dist.is_main)
    modes = ("sa", "glca", "sa+glca") if cfg.model.glca else ("sa",)
    stop = t.epochs if cfg.run.stop_after_epochs is None else progress.next_epoch + cfg.run.stop_after_epochs
    for epoch in range(progress.next_epoch, min(t.epochs, stop)):
        epoch_seed = t.seed * 1_000_003 + epoch
        seed_everything(epoch_seed + 7_919 * dist.rank)  # distinct masks and pairs per process
        start_epoch(parts.train_loader, epoch, epoch_seed)
        reset_peak_memory(parts.device)
        try:
            stats = train_one_epoch(
                parts.step_module, parts.train_loader, parts.optimizer, parts.scaler, parts.device,
                parts.schedule, progress.step, settings,
                bad_streak=progress.bad_streak, epoch=epoch,
            )  # fmt: skip
        except TrainingDiverged as err:
            last_good = ckpt_dir / "last.pt"
            where = f"the last good checkpoint is {last_good}" if last_good.exists() else "no checkpoint yet"
            raise TrainingDiverged(f"{err}; {where} (left untouched)") from err
        evaluation = evaluate(
            model, parts.eval_loader, parts.device, len(data.classes), parts.amp_dtype, modes
        )
        metric = _selection_metric(evaluation)
        is_best = metric > progress.best
        progress = Progress(
            next_epoch=epoch + 1,
            step=progress.step + stats.steps,
            best=max(progress.best, metric),
            bad_streak=stats.bad_streak,
            initial_weights=progress.initial_weights,
        )
        if not dist.is_main:
            continue
        row = _metrics_row(epoch, stats, evaluation, criterion.raw_weights(), peak_memory_mb(parts.device))
        history.append(row)
        pd.DataFrame(history).to_csv(run_dir / "metrics.csv", index=False)
        plot_metrics(run_dir / "metrics.csv", run_dir / "curves.png")
        _log_epoch(row, data, writer)
        for message in health_warnings(history, len(data.classes), t.warmup_epochs, progress.initial_weights):
            _logger.warning("health: %s", message)
        checkpoint = {key: module.state_dict() for key, module in modules.items()}
        checkpoint.update(
            schedule=asdict(parts.schedule),
            epoch=epoch,
            global_step=progress.step,
            best_metric=progress.best,
            bad_streak=progress.bad_streak,
            initial_loss_weights=progress.initial_weights,
            config=cfg.to_dict(),
            classes=data.classes,
            eval_split=data.eval_split,
            rng=rng_states(),
        )
        save_checkpoint(checkpoint, ckpt_dir / "last.pt")
        if is_best:
            save_checkpoint(checkpoint, ckpt_dir / "best.pt")
    if writer is not None:
        writer.close()
    barrier()  # no process leaves while rank 0 still writes the last checkpoint
    return RunResult(
        run_dir=run_dir,
        epochs_done=progress.next_epoch,
        best_metric=progress.best,
        history=history,
        model=model,
    )


def _log_epoch(row: dict[str, Any], data: DataBundle, writer) -> None:
    by_branch = "/".join(f"{row[f'train_acc_{b}']:.1f}" for b in ("sa", "glca", "pwca"))
    weights = "/".join(f"{row[f'weight_{b}']:.3f}" for b in ("sa", "glca", "pwca"))
    top1 = "/".join(f"{row[c]:.2f}" for c in ("eval_top1_sa", "eval_top1_glca", "eval_top1_sa_glca"))
    _logger.info(
        "epoch %d: loss %.4f | train acc sa/glca/pwca %s | %s top-1 sa/glca/sa+glca %s | weights %s | "
        "lr %.3g | %.0f s | peak %.0f MB",
        row["epoch"], row["train_loss"], by_branch, data.eval_split, top1, weights, row["lr"],
        row["epoch_time_s"], row["peak_mem_mb"],
    )  # fmt: skip
    if row["skipped_steps"]:
        _logger.warning(
            "epoch %d: %d optimizer steps skipped (non-finite)", row["epoch"], row["skipped_steps"]
        )
    if writer is not None:
        for key, value in row.items():
            if key != "epoch" and not (isinstance(value, float) and math.isnan(value)):
                writer.add_scalar(key, value, row["epoch"])


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise RuntimeError(
            "run.tensorboard is true but the tensorboard package is not installed: "
            "pip install tensorboard (or set run.tensorboard: false)"
        ) from err
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _attach_log_file(path: Path) -> None:
    """Copy the package's log records into the run directory (once per file)."""
    root = logging.getLogger("dual_cross_attention")
    if any(
        isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in root.handlers
    ):
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def config_from_checkpoint(state: dict[str, Any]) -> Config:
    return from_dict(state["config"], source="checkpoint config")
