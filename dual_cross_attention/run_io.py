"""What a training run writes to its directory: the log file, config.yaml, metrics.csv (one row
per epoch), curves.png, TensorBoard events and the checkpoints.

Only rank 0 writes; under torchrun the other processes log warnings only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from .checkpoint import save_checkpoint
from .config import Config
from .distributed import DistInfo
from .engine import EpochStats
from .errors import DcalError, SetupError
from .evaluation.metrics import Summary, column_name
from .evaluation.reid import ReIDSummary
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


REID_COLUMNS = ("mAP", "rank1", "rank5", "mINP")  # per mode, in a Re-ID run's metrics.csv


def metrics_row(
    epoch: int,
    stats: EpochStats,
    evaluation: Summary | ReIDSummary,
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
    reid = isinstance(evaluation, ReIDSummary)
    for mode in EVAL_MODES:
        values = evaluation.metrics.get(mode, {})
        for key in REID_COLUMNS if reid else ("top1",):
            row[f"eval_{key}_{column_name(mode)}"] = values.get(key, math.nan)
    row.update(
        eval_images=evaluation.num_images,
        skipped_steps=stats.skipped_steps,
        epoch_time_s=stats.seconds,
        peak_mem_mb=peak_mb[0],
        peak_reserved_mb=peak_mb[1],
    )
    return row


class RunRecorder:
    """Rank 0's per-epoch record: metrics.csv, curves.png, the log line, and on request TensorBoard
    scalars and a Weights & Biases run.

    Args:
        run_dir: the run directory (exists).
        history: rows already in metrics.csv (a resumed run continues them).
        tensorboard: also write TensorBoard events (needs the tensorboard package).
        wandb_project: also log each row and curves.png to a W&B run in this project (needs the
            wandb package); None: no W&B.
        config: the resolved config, stored with the W&B run.
    """

    def __init__(
        self,
        run_dir: Path,
        history: list[dict[str, Any]],
        tensorboard: bool,
        wandb_project: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.history = history
        self.writer = _tensorboard(run_dir) if tensorboard else None
        self.wandb = _wandb(run_dir, wandb_project, config or {}, not history) if wandb_project else None

    def record(self, row: dict[str, Any], eval_split: str) -> None:
        self.history.append(row)
        pd.DataFrame(self.history).to_csv(self.run_dir / "metrics.csv", index=False)
        curves = plot_metrics(self.run_dir / "metrics.csv", self.run_dir / "curves.png")
        _log_epoch(row, eval_split)
        # NaN marks a branch or mode the model lacks: nothing to plot
        scalars = {
            k: v for k, v in row.items() if k != "epoch" and not (isinstance(v, float) and math.isnan(v))
        }
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, row["epoch"])
        if self.wandb is not None:
            from wandb import Image  # (imported by _wandb already)

            self.wandb.log({**scalars, "curves": Image(str(curves))}, step=row["epoch"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def _log_epoch(row: dict[str, Any], eval_split: str) -> None:
    by_branch = "/".join(f"{row[f'train_acc_{b}']:.1f}" for b in BRANCHES)
    weights = "/".join(f"{row[f'weight_{b}']:.3f}" for b in BRANCHES)
    key = "mAP" if "eval_mAP_sa" in row else "top1"
    scores = "/".join(f"{row[f'eval_{key}_{column_name(m)}']:.2f}" for m in EVAL_MODES)
    _logger.info(
        "epoch %d: loss %.4f | train acc sa/glca/pwca %s | %s %s sa/glca/sa+glca %s | weights %s | "
        "lr %.3g | %.0f s | peak %.0f MB allocated, %.0f MB reserved",
        row["epoch"], row["train_loss"], by_branch, eval_split, "mAP" if key == "mAP" else "top-1", scores,
        weights, row["lr"],
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
        raise SetupError(
            "run.tensorboard is true but the tensorboard package is not installed: "
            "pip install tensorboard (or set run.tensorboard: false)"
        ) from err
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _wandb(run_dir: Path, project: str, config: dict[str, Any], fresh: bool):
    """The W&B run of ``run_dir``, in the mode the environment sets (``WANDB_MODE``; wandb's
    default is online). Its id is kept in ``wandb_id.txt``, so ``--resume`` continues the same
    W&B run; a fresh start (no metrics.csv rows kept) begins a new one."""
    try:
        import wandb
    except ImportError as err:
        raise SetupError(
            "run.wandb is true but the wandb package is not installed: "
            "pip install wandb (or set run.wandb: false)"
        ) from err
    id_file = run_dir / "wandb_id.txt"
    if fresh or not id_file.is_file():
        id_file.write_text(os.urandom(8).hex() + "\n")
    run_id = id_file.read_text().strip()
    try:
        run = wandb.init(
            project=project, name=run_dir.name, dir=str(run_dir), config=config, id=run_id, resume="allow"
        )
    except wandb.errors.Error as err:  # no login, server unreachable, ...
        raise SetupError(
            f"run.wandb is true but wandb.init failed: {err} (run `wandb login`, or set "
            "WANDB_MODE=offline and `wandb sync` later, or set run.wandb: false)"
        ) from err
    _logger.info("W&B run %s in project %s (%s)", run_id, project, run.settings.mode)
    return run


def save_checkpoints(
    state: dict[str, Any], checkpoint_dir: Path, is_best: bool, every: int = 0, keep: int | None = None
) -> None:
    """``last.pt`` every epoch, ``best.pt`` when the selection metric improved, and with ``every``
    a snapshot ``epoch_<E>.pt`` after every ``every``-th epoch (E as in metrics.csv), of which the
    newest ``keep`` are kept. Every write is atomic."""
    save_checkpoint(state, checkpoint_dir / "last.pt")
    if is_best:
        save_checkpoint(state, checkpoint_dir / "best.pt")
    epoch = state["epoch"]
    if every and (epoch + 1) % every == 0:
        save_checkpoint(state, checkpoint_dir / f"epoch_{epoch}.pt")
        snapshots = sorted(checkpoint_dir.glob("epoch_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
        for old in snapshots[:-keep] if keep else []:
            old.unlink()
            _logger.info("removed %s (train.keep_checkpoints %d)", old, keep)


class RunInUseError(DcalError, RuntimeError):
    """Another live process trains into the same run directory."""


class RunLock:
    """A lock file in the run directory holding the host and PID of the process that trains there.

    A second process on the same run stops with the holder's PID and host. A lock left by a
    process that no longer runs on this host (killed, crashed) is stale and taken over, with a
    log line; a lock from another host cannot be checked from here and counts as held.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "run.lock"
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = json.dumps({"host": socket.gethostname(), "pid": os.getpid()})
        handle, tmp = tempfile.mkstemp(prefix=".run.lock.", dir=self.path.parent)
        try:
            with os.fdopen(handle, "w") as file:
                file.write(mine)
            for _ in range(2):
                try:
                    os.link(tmp, self.path)  # atomic: fails if a lock exists, never leaves a partial one
                    self.held = True
                    return
                except FileExistsError:
                    self._take_over_if_stale()
        finally:
            os.unlink(tmp)
        raise RunInUseError(f"{self.path.parent} is locked by {self.path}, which keeps reappearing")

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            host, pid = str(holder["host"]), int(holder["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            _logger.warning("replacing the unreadable lock file %s", self.path)
            self.path.unlink(missing_ok=True)
            return
        if host == socket.gethostname() and not _alive(pid):
            _logger.warning("taking over %s: PID %d on %s no longer runs", self.path, pid, host)
            self.path.unlink(missing_ok=True)
            return
        raise RunInUseError(
            f"{self.path.parent} is in use by PID {pid} on {host}. Wait for it, train under another "
            f"--set run.name=..., or, if that process is gone, delete {self.path}."
        )

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
