"""Two gloo processes on the CPU for tests/test_retrieval_gather.py and tests/test_triplet.py, each
saving what it computed to <out>/rank<R>.pt for the test to compare with one process."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from dual_cross_attention.retrieval.gather import gather_list, gather_variable
from dual_cross_attention.retrieval.triplet import global_batch_hard_triplet_loss

WORLD = 2
SHARD_ROWS = (3, 5)


def gather_rows(rank: int) -> torch.Tensor:
    """Rank r's shard of the (8, 2) matrix whose row n is (n, -n)."""
    start = sum(SHARD_ROWS[:rank])
    index = torch.arange(start, start + SHARD_ROWS[rank], dtype=torch.float32)
    return torch.stack([index, -index], dim=1)


def gather_weights(rank: int) -> torch.Tensor:
    """What rank r multiplies the gathered (8, 2) matrix with, for a loss with a known gradient."""
    return torch.arange(16, dtype=torch.float32).view(8, 2) * (rank + 1)


def triplet_batch() -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear]:
    """16 inputs of 4 identities interleaved, so each process holds 2 of each, and a seeded layer."""
    gen = torch.Generator().manual_seed(7)
    inputs = torch.randn(16, 5, generator=gen)
    labels = torch.arange(16) % 4
    torch.manual_seed(7)
    return inputs, labels, torch.nn.Linear(5, 6)


def spawn_two(worker: Callable[[int, str, str], None], out: Path) -> None:
    """Run ``worker(rank, init_file, out)`` in two processes; forked, so they start without
    importing torch again (seconds each on a busy machine)."""
    mp.start_processes(worker, args=(str(out / "init"), str(out)), nprocs=WORLD, start_method="fork")


def _join(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)


def gather_worker(rank: int, init_file: str, out: str) -> None:
    _join(rank, init_file)
    shard = gather_rows(rank).requires_grad_()
    gathered = gather_variable(shard)
    (gathered * gather_weights(rank)).sum().backward()
    pids = np.arange(SHARD_ROWS[rank], dtype=np.int64) + 100 * rank
    paths = [f"r{rank}_{i}.jpg" for i in range(SHARD_ROWS[rank])]
    try:
        gather_variable(torch.zeros(2, 3 + rank))
        mismatch = ""
    except ValueError as error:
        mismatch = str(error)
    result = {
        "gathered": gathered.detach(),
        "grad": shard.grad,
        "pids": gather_variable(pids),
        "paths": gather_list(paths),
        "mismatch": mismatch,
    }
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def triplet_worker(rank: int, init_file: str, out: str) -> None:
    _join(rank, init_file)
    inputs, labels, layer = triplet_batch()
    model = DistributedDataParallel(layer)
    mine = slice(8 * rank, 8 * rank + 8)
    result = {}
    for soft_margin in (False, True):
        model.zero_grad()
        features = model(inputs[mine])
        features.retain_grad()
        loss = global_batch_hard_triplet_loss(features, labels[mine], margin=0.3, soft_margin=soft_margin)
        loss.backward()
        result[soft_margin] = {
            "loss": loss.detach(),
            "feature_grad": features.grad,
            "weight_grad": layer.weight.grad.clone(),  # averaged over the processes by DDP
            "bias_grad": layer.bias.grad.clone(),
        }
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()
