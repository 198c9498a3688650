"""What a training run writes to its directory: the log file, config.yaml, metrics.csv (one row
per epoch), curves.png, TensorBoard events and the checkpoints.

Only rank 0 writes; under torchrun the other processes log warnings only.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd

from .checkpoint import save_checkpoint
from .config import Config
from .distributed import DistInfo
from .engine import EpochStats
from .evaluation.metrics import Summary, column_name
from .visualize import plot_metrics

_logger = logging.getLogger(__name__)

PACKAGE_LOGGER = "dual_cross_attention"
BRANCHES = ("sa", "glca", "pwca")
EVAL_MODES = ("sa", "glca", "sa+glca")


def prepare_run_dir(cfg: Config, run_dir: Path, dist: DistInfo) -> None:
    """Rank 0: create the run directory, copy the package's log into ``train.log`` and write the
    resolved config; the other processes keep quiet (rank 0 speaks for all)."""
    if not dist.is_main:
        logging.getLogger(PACKAGE_LOGGER).setLevel(logging.WARNING)
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    attach_log_file(run_dir / "train.log")
    _logger.info("resolved config:\n%s", cfg.to_yaml())
    (run_dir / "config.yaml").write_text(cfg.to_yaml())


def attach_log_file(path: Path) -> None:
    """Copy the package's log records into ``path`` (once per file)."""
    root = logging.getLogger(PACKAGE_LOGGER)
    if any(
        isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in root.handlers
    ):
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def read_history(csv: Path, upto_epoch: int) -> list[dict[str, Any]]:
    """Rows of an existing metrics.csv up to the resumed epoch (later rows belong to lost work)."""
    if not csv.exists():
        return []
    frame = pd.read_csv(csv)
    return frame[frame["epoch"] <= upto_epoch].to_dict("records")


def metrics_row(
    epoch: int,
    stats: EpochStats,
    evaluation: Summary,
    weights: dict[str, float],
    peak_mb: tuple[float, float],
) -> dict[str, Any]:
    """One metrics.csv row; a branch or mode the model lacks is NaN.

    Args:
        peak_mb: (allocated, reserved) peak memory of the epoch (``runtime.peak_memory_mb``).
    """
    row: dict[str, Any] = {"epoch": epoch, "lr": stats.lr, "train_loss": stats.loss}
    for b in BRANCHES:
        row[f"train_loss_{b}"] = stats.branch_loss.get(b, math.nan)
        row[f"train_acc_{b}"] = stats.branch_acc.get(b, math.nan)
        row[f"weight_{b}"] = weights.get(b, math.nan)
    for mode in EVAL_MODES:
        row[f"eval_top1_{column_name(mode)}"] = evaluation.metrics.get(mode, {}).get("top1", math.nan)
    row.update(
        eval_images=evaluation.num_images,
        skipped_steps=stats.skipped_steps,
        epoch_time_s=stats.seconds,
        peak_mem_mb=peak_mb[0],
        peak_reserved_mb=peak_mb[1],
    )
    return row


class RunRecorder:
    """Rank 0's per-epoch record: metrics.csv, curves.png, the log line and TensorBoard scalars.

    Args:
        run_dir: the run directory (exists).
        history: rows already in metrics.csv (a resumed run continues them).
        tensorboard: also write TensorBoard events (needs the tensorboard package).
    """

    def __init__(self, run_dir: Path, history: list[dict[str, Any]], tensorboard: bool) -> None:
        self.run_dir = run_dir
        self.history = history
        self.writer = _tensorboard(run_dir) if tensorboard else None

    def record(self, row: dict[str, Any], eval_split: str) -> None:
        self.history.append(row)
        pd.DataFrame(self.history).to_csv(self.run_dir / "metrics.csv", index=False)
        plot_metrics(self.run_dir / "metrics.csv", self.run_dir / "curves.png")
        _log_epoch(row, eval_split)
        if self.writer is not None:
            for key, value in row.items():
                if key != "epoch" and not (isinstance(value, float) and math.isnan(value)):
                    self.writer.add_scalar(key, value, row["epoch"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _log_epoch(row: dict[str, Any], eval_split: str) -> None:
    by_branch = "/".join(f"{row[f'train_acc_{b}']:.1f}" for b in BRANCHES)
    weights = "/".join(f"{row[f'weight_{b}']:.3f}" for b in BRANCHES)
    top1 = "/".join(f"{row[f'eval_top1_{column_name(m)}']:.2f}" for m in EVAL_MODES)
    _logger.info(
        "epoch %d: loss %.4f | train acc sa/glca/pwca %s | %s top-1 sa/glca/sa+glca %s | weights %s | "
        "lr %.3g | %.0f s | peak %.0f MB allocated, %.0f MB reserved",
        row["epoch"], row["train_loss"], by_branch, eval_split, top1, weights, row["lr"],
        row["epoch_time_s"], row["peak_mem_mb"], row["peak_reserved_mb"],
    )  # fmt: skip
    if row["skipped_steps"]:
        _logger.warning(
            "epoch %d: %d optimizer steps skipped (non-finite)", row["epoch"], row["skipped_steps"]
        )


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise RuntimeError(
            "run.tensorboard is true but the tensorboard package is not installed: "
            "pip install tensorboard (or set run.tensorboard: false)"
        ) from err
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def save_checkpoints(state: dict[str, Any], checkpoint_dir: Path, is_best: bool) -> None:
    """``last.pt`` every epoch, and ``best.pt`` when the selection metric improved (atomic writes)."""
    save_checkpoint(state, checkpoint_dir / "last.pt")
    if is_best:
        save_checkpoint(state, checkpoint_dir / "best.pt")
