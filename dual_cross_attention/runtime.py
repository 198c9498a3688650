"""The machine-facing pieces of training: device, precision, seeding, memory.

CUDA-only calls (bf16 capability, ``empty_cache``, peak-memory readings) are kept here, thin,
so everything around them runs and is tested on a CPU.
"""

from __future__ import annotations

import logging
import random
import resource
import sys

import numpy as np
import torch

from .errors import SetupError

_logger = logging.getLogger(__name__)

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU. Asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SetupError(f"train.device is '{name}' but no CUDA device is visible; use 'auto' or 'cpu'")
    return device


def native_bf16(device: torch.device) -> bool:
    """bf16 matmuls and fused bf16 attention need compute capability 8.0 (Ampere) or newer.

    ``torch.cuda.is_bf16_supported()`` also answers yes on older GPUs (T4, V100, RTX 20xx),
    where bf16 is emulated: slow, and SDPA falls back to the math kernel, which keeps the
    N x N attention maps for backward.
    """
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def _gpu(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}"


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for training on ``device``; logs the choice and the reason.

    ``auto``: bf16 on a GPU that runs it natively, fp16 with loss scaling on older GPUs, fp32 on
    the CPU (CPU autocast is slow and buys nothing). An explicit choice the device cannot run
    is an error that says what to use instead.
    """
    if name == "auto":
        if device.type != "cuda":
            dtype, why = torch.float32, f"device {device.type}"
        elif native_bf16(device):
            dtype, why = torch.bfloat16, f"{_gpu(device)} runs bf16 natively"
        else:
            dtype, why = (
                torch.float16,
                f"{_gpu(device)} has no native bf16 (needs 8.0); fp16 with loss scaling",
            )
        _logger.info("precision auto -> %s (%s)", str(dtype).removeprefix("torch."), why)
        return dtype
    dtype = PRECISIONS[name]
    if dtype == torch.float16 and device.type != "cuda":
        raise SetupError("train.precision fp16 needs a CUDA device; use fp32 (or bf16) on the CPU")
    if dtype == torch.bfloat16 and device.type == "cuda" and not native_bf16(device):
        raise SetupError(
            f"train.precision bf16: the {_gpu(device)} emulates bf16 (native from 8.0), which is slow and "
            "keeps full attention maps for backward; use train.precision fp16 (with loss scaling) or auto"
        )
    return dtype


def inference_precision(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for inference with a model trained at precision ``name``.

    Weights are fp32 whatever the training precision, so where the stored precision cannot run
    (an fp16 or bf16 run evaluated on a CPU, or bf16 on a GPU without native support) inference
    uses fp32 and says so instead of refusing.
    """
    try:
        return resolve_precision(name, device)
    except SetupError as err:
        _logger.warning("train.precision %s is unavailable here (%s); inference uses fp32", name, err)
        return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """One autocast for every precision: disabled for fp32."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """Loss scaling only for fp16; a disabled scaler is a no-op so the step code has one path."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def maybe_empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> tuple[float, float]:
    """(allocated, reserved) peak memory in MiB since the last reset.

    On CUDA, reserved is what the caching allocator holds from the device (allocated plus its
    cache and fragmentation): the figure an out-of-memory error is about. On the CPU both are
    the process's peak RSS.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, torch.cuda.max_memory_reserved(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss = peak / 2**20 if sys.platform == "darwin" else peak / 2**10
    return rss, rss


def device_memory_mb(device: torch.device) -> float | None:
    """Total memory of a CUDA device in MiB; None on the CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / 2**20
