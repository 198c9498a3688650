"""All-gather along dim 0 when every process holds a different number of rows (evaluation shards,
the last batch of an epoch), with gradients flowing back to the process that owns each row.

``dist.all_gather`` needs equal shapes, so the sizes are gathered first, every shard is padded to
the largest, and the padding is cut off again: the result holds every row once, in rank order.
Without torch.distributed initialised each function returns its input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..distributed import gather_from_all


def gather_variable(tensor: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """All processes' ``tensor`` (N_r, ...) concatenated in rank order: (sum N_r, ...).

    Shards may differ in their first dimension only. A tensor that requires grad is gathered with
    autograd: the gradient of every process's loss with respect to a gathered row is summed onto
    the process that owns the row. A numpy array (e.g. pids) comes back as a numpy array. CPU
    tensors are gathered through the GPU when the backend is NCCL.
    """
    if isinstance(tensor, np.ndarray):
        return gather_variable(torch.from_numpy(tensor)).numpy()
    return gather_variable_with_sizes(tensor)[0]


def gather_variable_with_sizes(tensor: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """``gather_variable`` and the number of rows each process gave, by rank (single process: [N])."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor, [len(tensor)]
    home = tensor.device
    if dist.get_backend() == dist.Backend.NCCL and home.type != "cuda":
        tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    shapes = _gather_shapes(tensor)  # (W, ndim)
    if (shapes[:, 1:] != shapes[0, 1:]).any():
        by_rank = [tuple(s) for s in shapes.tolist()]
        raise ValueError(f"gather_variable: shards may differ in dim 0 only, got shapes {by_rank} by rank")
    rows = shapes[:, 0].tolist()
    padded = _pad_rows(tensor, max(rows))
    if tensor.requires_grad:
        pieces = _AllGather.apply(padded)
    else:
        pieces = [torch.empty_like(padded) for _ in rows]
        dist.all_gather(pieces, padded.contiguous())
    out = torch.cat([piece[:n] for piece, n in zip(pieces, rows, strict=True)])
    return out.to(home), rows


def gather_list(items: Sequence[Any]) -> list[Any]:
    """All processes' ``items`` (any picklable values, e.g. image paths) concatenated in rank order."""
    return [item for shard in gather_from_all(list(items)) for item in shard]


def _gather_shapes(tensor: torch.Tensor) -> torch.Tensor:
    shape = torch.tensor(tensor.shape, dtype=torch.int64, device=tensor.device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)  # a differing ndim would fail here, on every process alike
    return torch.stack(shapes).cpu()


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if len(tensor) == rows:
        return tensor
    padding = tensor.new_zeros((rows - len(tensor), *tensor.shape[1:]))
    return torch.cat([tensor, padding])  # differentiable: the padding just gets no gradient


class _AllGather(torch.autograd.Function):
    """Equal-shape all-gather whose backward sums every process's gradient onto the owner.

    Written out because ``torch.distributed.nn.functional.all_gather`` is deprecated (it warns on
    every call); its backward is the same sum, done here with one all-reduce that works on gloo
    and NCCL alike.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(pieces, tensor.contiguous())
        return tuple(pieces)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(grads)  # (W, rows, ...): this process's gradient for every shard
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        return stacked[dist.get_rank()]
