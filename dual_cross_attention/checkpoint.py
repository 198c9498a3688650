"""Checkpoints: atomic writes, exact-resume contents, and loading that cannot run code.

A checkpoint is written to a temporary file in the same folder and renamed over the old one,
so a crash mid-write never leaves a truncated ``last.pt``. It is read with
``torch.load(weights_only=True)``: a file that carries pickled code is refused.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DcalError

_logger = logging.getLogger(__name__)


class CheckpointError(DcalError, RuntimeError):
    """A checkpoint cannot be read or does not fit this run."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; errors name the file and the reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated, or not a file torch.save wrote)"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain containers, which "
            f"could run code when unpickled ({err}). Only load checkpoints written by this trainer."
        ) from err
    except (RuntimeError, EOFError) as err:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or not a torch file): {err}"
        ) from err
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a dcal checkpoint (no 'model' entry)")
    return state


def rng_states() -> dict[str, Any]:
    """RNG states of python, numpy and torch, as tensors and plain values (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate((states["python_version"], tuple(states["python"]), states["python_gauss"]))
    n = states["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        restore_cuda_rng_states(states["cuda"])


def restore_cuda_rng_states(saved: list[torch.Tensor]) -> None:
    """Restore the saved per-GPU states of the GPUs this process sees, and only those.

    A checkpoint holds one state per GPU visible when it was written (8 under an 8-GPU
    torchrun); resuming with fewer GPUs must not index generators that do not exist. The
    trainer reseeds every RNG at each epoch start anyway, so the GPUs left out lose nothing.
    """
    visible = torch.cuda.device_count()
    for index, state in enumerate(saved[:visible]):
        torch.cuda.set_rng_state(state, index)
    if len(saved) != visible:
        _logger.info(
            "checkpoint holds RNG states of %d GPUs, %d visible: restored %d", len(saved), visible,
            min(len(saved), visible),
        )  # fmt: skip
