"""Provenance: what produced a run or a reported number, so that it can be reproduced.

One record, the same for a run folder (``provenance.json``, written by rank 0 when a run starts
or resumes, and stored in each checkpoint) and for every evaluate.py report (its ``--json`` and
its printed header): the code version (git commit and whether the tree had changes), the torch /
timm / CUDA versions, the device, the seed, a hash of the resolved config, the dataset and its
version, the evaluation protocol, the test-time augmentation and how the checkpoint was chosen.

Nothing here may fail a run: outside a git tree, or without git, the code version is 'unknown'.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm
import torch

from .config import Config

if TYPE_CHECKING:
    from .prediction import TrainedModel

_logger = logging.getLogger(__name__)

PROVENANCE_FILE = "provenance.json"
UNKNOWN = "unknown"
GIT_TIMEOUT_S = 5.0
PACKAGE_DIR = Path(__file__).resolve().parent


def _git(where: Path, *args: str) -> str | None:
    """stdout of ``git -C where args``, or None when git is missing, slow or fails."""
    try:
        done = subprocess.run(
            ["git", "-C", str(where), *args], capture_output=True, text=True, timeout=GIT_TIMEOUT_S
        )
    except (OSError, subprocess.SubprocessError):  # no git binary, timeout
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version(where: Path = PACKAGE_DIR) -> dict[str, Any]:
    """``{"git_commit": sha, "git_dirty": bool}`` of the git tree the package lives in; 'unknown'
    for both when it is not tracked by one (e.g. installed into site-packages). Dirty counts
    untracked files too: a new module changes the code as much as an edited one."""
    commit = _git(where, "rev-parse", "HEAD")
    # A package copied into a folder inside another repository (a venv in a repo) is not that
    # repository's code: require the package itself to be tracked.
    tracked = commit is not None and _git(where, "ls-files", "--error-unmatch", "__init__.py") is not None
    if not tracked:
        return {"git_commit": UNKNOWN, "git_dirty": UNKNOWN}
    status = _git(where, "status", "--porcelain")
    return {"git_commit": commit, "git_dirty": UNKNOWN if status is None else bool(status)}


def device_name(device: torch.device) -> str:
    """The accelerator's name (e.g. 'NVIDIA H200'), or the CPU's architecture."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine() or UNKNOWN})"


def environment(device: torch.device, world_size: int = 1) -> dict[str, Any]:
    """Code version, software versions and the device of this process."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        **code_version(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a TorchVersion, which weights_only checkpoints refuse
        "timm": str(timm.__version__),
        "cuda": torch.version.cuda,  # None: a CPU build of torch
        "cudnn": cudnn,
        "device": device_name(device),
        "world_size": world_size,
    }


def config_sha256(cfg: Config) -> str:
    """sha256 of the resolved config as canonical JSON (sorted keys, no whitespace): equal configs
    hash equal, and changing any one value changes it."""
    text = json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fgvc_protocol(split: str) -> str:
    return f"top-1 / top-5 / mean per-class accuracy over all images of the {split} split, each counted once"


def selection_rule(eval_split: str, select_on_test: bool) -> str:
    """How best.pt is chosen: on validation accuracy when the run has a validation split; without
    one, the last epoch is kept (choosing on test accuracy would report a number picked on the
    data it measures) unless ``train.select_on_test`` asks for exactly that."""
    if eval_split == "val":
        return "val"
    return "test" if select_on_test else "last"


# What "top-1" means for each task's ``train.select_metric``, and what ``auto`` selects on.
SELECT_METRIC_TEXT = {
    "fgvc": {"auto": "top-1", "top1": "top-1", "mAP": "mAP", "auc": "pair verification AUC"},
    "reid": {"auto": "mAP", "top1": "CMC rank-1", "mAP": "mAP", "auc": "pair verification AUC"},
}
VALIDATION_SPLIT_TEXT = {
    "fgvc": "data.val_fraction carves the validation split",
    "reid": "data.val_fraction holds whole identities out of train",
}
LAST_TEXT = {
    "fgvc": "the last epoch: the run has no validation split (set data.val_fraction > 0 to select on one)",
    "reid": "the last epoch: no validation identities (set data.val_fraction > 0 to hold some out of train "
    "and select on their mAP; train.select_on_test: true picks the best test mAP instead)",
}


def selection(eval_split: str, select_on_test: bool, select_metric: str, reid: bool) -> dict[str, str]:
    """How best.pt is chosen: ``split`` (the run's evaluation split, val or test), ``rule`` (val,
    test or last) and ``text``, the sentence the training log states, in the task's own metric."""
    rule = selection_rule(eval_split, select_on_test)
    task = "reid" if reid else "fgvc"
    metric = SELECT_METRIC_TEXT[task][select_metric]
    named = " (train.select_metric)" if select_metric != "auto" else ""
    if rule == "last":
        text = LAST_TEXT[task]
    elif rule == "val":
        text = f"the epoch with the best validation {metric}{named} ({VALIDATION_SPLIT_TEXT[task]})"
    else:
        text = f"the epoch with the best TEST {metric}{named} (train.select_on_test: true): picked on test"
    return {"split": eval_split, "rule": rule, "text": text}


def checkpoint_selection(cfg: Config, origin: dict[str, Any]) -> dict[str, Any]:
    """``selection`` for a checkpoint's run, plus the checkpoint's ``epoch``, whether it is the epoch
    that rule selected (``selected``; None for checkpoints written before this was recorded) and
    ``checkpoint``, that in words.

    Args:
        origin: what the checkpoint says about its training (``TrainedModel.origin``).
    """
    split = origin.get("eval_split") or "test"
    chosen: dict[str, Any] = selection(
        split, cfg.train.select_on_test, cfg.train.select_metric, cfg.task == "reid"
    )
    epoch, selected = origin.get("epoch"), origin.get("selected")
    if chosen["rule"] == "last":
        what = f"epoch {epoch}, the latest: no split chose it"
    elif selected is True:
        what = f"epoch {epoch}, chosen on the {split} split"
    elif selected is False:
        what = f"epoch {epoch}, the latest, not the one chosen on the {split} split (that is best.pt)"
    else:
        what = f"epoch {epoch} (the checkpoint does not record whether the {split} split chose it)"
    return {**chosen, "epoch": epoch, "selected": selected, "checkpoint": what}


def provenance(
    cfg: Config,
    device: torch.device,
    *,
    dataset_version: str,
    protocol: str,
    tta: str,
    chosen: dict[str, Any],
    world_size: int = 1,
) -> dict[str, Any]:
    """The record (see the module docstring).

    Args:
        dataset_version: e.g. 'MSMT17_V2' where a dataset has versions, else ''.
        protocol: how the numbers are measured (Re-ID: ``ReIDSummary.protocol``; FGVC:
            ``fgvc_protocol``).
        tta: the test-time augmentation of those numbers.
        chosen: how the (best) checkpoint is chosen (``selection``), with whatever the caller
            knows besides (the epoch of the checkpoint evaluated).
    """
    return {
        **environment(device, world_size),
        "seed": cfg.train.seed,
        "config_sha256": config_sha256(cfg),
        "dataset": {"name": cfg.data.dataset, "version": dataset_version or None, "root": cfg.data.root},
        "protocol": protocol,
        "tta": tta,
        "selection": chosen,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def evaluation_provenance(
    trained: TrainedModel, *, protocol: str, tta: str, dataset_version: str = "", world_size: int = 1
) -> dict[str, Any]:
    """The record of an evaluation of ``trained``: this process's code and software, the evaluated
    config (the checkpoint's, ``--set`` overrides applied), the checkpoint's file and hash, how it
    was chosen, and under ``training`` the provenance its run stored (None for older checkpoints)."""
    chosen = checkpoint_selection(trained.config, trained.origin)
    record = provenance(
        trained.config, trained.device, dataset_version=dataset_version, protocol=protocol, tta=tta,
        chosen=chosen, world_size=world_size,
    )  # fmt: skip
    record.update(
        checkpoint=str(trained.checkpoint.resolve()),
        checkpoint_sha256=file_sha256(trained.checkpoint),
        overrides=list(trained.overrides),
        training=trained.origin.get("provenance") or None,
    )
    return record


def write_run_provenance(run_dir: Path, record: dict[str, Any], resumed: bool) -> Path:
    """Write ``run_dir/provenance.json``; on a resume the records of the earlier invocations of
    the run are kept under ``earlier`` (oldest first), since code or machine may have changed."""
    path = run_dir / PROVENANCE_FILE
    earlier: list[dict[str, Any]] = []
    if resumed and path.is_file():
        try:
            previous = json.loads(path.read_text())
            earlier = [*previous.pop("earlier", []), previous]
        except (OSError, ValueError) as err:
            _logger.warning("%s is unreadable (%s): it is replaced by this invocation's record", path, err)
    path.write_text(json.dumps({**record, "earlier": earlier}, indent=2, default=str) + "\n")
    return path


def format_provenance(record: dict[str, Any]) -> list[str]:
    """The lines a report prints: code and software, data and protocol, how the checkpoint was chosen."""
    commit, dirty = record["git_commit"], record["git_dirty"]
    code = commit if commit == UNKNOWN else commit[:12] + (" (dirty)" if dirty is True else "")
    cuda = record["cuda"] or "none"
    data = record["dataset"]
    version = f" {data['version']}" if data["version"] else ""
    chosen = record["selection"]
    lines = [
        f"code {code} | torch {record['torch']}, timm {record['timm']}, CUDA {cuda} | {record['device']} "
        f"x {record['world_size']} | seed {record['seed']} | config sha256 {record['config_sha256'][:12]}",
        f"dataset {data['name']}{version} | TTA {record['tta']} | protocol: {record['protocol']}",
    ]
    if "checkpoint" in chosen:
        lines.append(f"checkpoint: {chosen['checkpoint']}; best.pt is {chosen['text']}")
    else:
        lines.append(f"best.pt: {chosen['text']}")
    return lines
