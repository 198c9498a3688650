"""The machine-facing pieces of training: device, precision, seeding, memory.

CUDA-only calls (bf16 capability, ``empty_cache``, peak-memory readings) are kept here, thin,
so everything around them runs and is tested on a CPU.
"""

from __future__ import annotations

import random
import resource
import sys

import numpy as np
import torch

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU. Asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device is '{name}' but no CUDA device is visible; use 'auto' or 'cpu'")
    return device


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on CUDA that supports it, else fp32 (CPU autocast is slow and buys nothing)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    dtype = PRECISIONS[name]
    if dtype == torch.float16 and device.type != "cuda":
        raise RuntimeError("train.precision fp16 needs a CUDA device; use fp32 (or bf16) on the CPU")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RuntimeError(
            "this GPU does not support bf16; use train.precision fp16 (with loss scaling) or fp32"
        )
    return dtype


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


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated since the last reset; on the CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
