"""Multi-process training with torchrun + DistributedDataParallel, and the no-op single-process path.

``torchrun --nproc_per_node=N train.py ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; without them
nothing here touches torch.distributed, so a plain ``python train.py`` needs no setup at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun set up (nccl on CUDA, gloo on CPU); single process: no-op.

    On CUDA each process takes the GPU of its LOCAL_RANK.
    """
    if not launched_by_torchrun():
        return DistInfo()
    info = DistInfo(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
        _logger.info("process group: %s, rank %d of %d", backend, info.rank, info.world_size)
    return info


def process_device(device: torch.device, info: DistInfo) -> torch.device:
    """Each torchrun process on its own GPU; CPU processes share the CPU."""
    if device.type == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    return device


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place (no-op in a single process) and return it."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process (any picklable value); single process: ``obj``."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_from_all(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process; single process: ``[obj]``."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


@contextlib.contextmanager
def main_process_first(info: DistInfo) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. generating the demo set), the others after it."""
    if not info.is_main:
        barrier()
    yield
    if info.is_main:
        barrier()


class ShardSampler(Sampler[int]):
    """Every index exactly once over all processes (rank r takes r, r + W, ...), no padding.

    DistributedSampler pads the last shard with repeated images so all ranks have equal
    counts; for evaluation that would count some test images twice.
    """

    def __init__(self, size: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, size, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
