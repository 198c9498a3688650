"""Attention rollout of the class token and the choice of GLCA's local queries (by rollout, by
the last block's map alone, or at random).

Only the class-token row of the rollout is needed, so a row vector is multiplied through the
head-averaged maps from the last block down; no N x N x N matrix chain is formed. Nothing here
carries a gradient, and everything is computed in float32 with autocast off: under bf16/fp16
autocast a matmul of float32 inputs would otherwise run (and return) in the low precision,
which moves the scores by about 1e-3 and can change which patches GLCA selects.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .blocks import softmax_scale


def fp32(device: torch.device) -> torch.autocast:
    """Autocast off on ``device``: operations run in the dtype of their (float32) inputs."""
    return torch.autocast(device_type=device.type, enabled=False)


@torch.no_grad()
def attention_map(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Head-averaged softmax(q k^T * scale) in float32, without autograd.

    Args:
        q: (B, nh, Nq, hd); k: (B, nh, N, hd).

    Returns:
        (B, Nq, N).
    """
    with fp32(q.device):
        scores = (q.float() * softmax_scale(q.shape[-1])) @ k.float().transpose(-2, -1)  # (B, nh, Nq, N)
        return scores.softmax(dim=-1).mean(dim=1)


@torch.no_grad()
def cls_attention_row(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Class-token row (B, N) of the head-averaged map, from the class query alone.

    Args:
        q: (B, nh, N, hd) or (B, nh, 1, hd); only the first query is used. k: (B, nh, N, hd).
    """
    return attention_map(q[:, :, :1], k)[:, 0]


@torch.no_grad()
def row_times_attention(
    row: torch.Tensor, q: torch.Tensor, k: torch.Tensor, buffer: torch.Tensor
) -> torch.Tensor:
    """row @ mean_h softmax(q_h k_h^T * scale), without forming the normalised map.

    Uses row @ softmax(S) = (row / Z) @ exp(S - max) per head, computed in place in ``buffer``,
    so each block costs one matmul, one exp and one reduction (the training-path rollout
    recomputes these maps for every block).

    Args:
        row: (B, N) float32. q, k: (B, nh, N, hd). buffer: (B, nh, N, N) float32 scratch space.

    Returns:
        (B, N) float32.
    """
    heads = q.shape[1]
    scale = softmax_scale(q.shape[-1])
    with fp32(q.device):
        scores = torch.matmul(q.float() * scale, k.float().transpose(-2, -1), out=buffer)  # (B, nh, N, N)
        scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
        weights = row[:, None, :] / (scores.sum(dim=-1) * heads)  # (B, nh, N): row_i / (Z_hi * nh)
        return (weights.unsqueeze(-2) @ scores).squeeze(-2).sum(dim=1)


@torch.no_grad()
def rollout_from_qk(qk_last_first: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Class-token rollout row from per-block queries and keys, last block first: for the
    training path, where the fused kernel never exposed the maps. One map's worth of scratch
    memory is reused for every block.

    Args:
        qk_last_first: (q, k) of blocks L, L-1, ..., 1, each (B, nh, N, hd). May be a generator.

    Returns:
        (B, N) as ``rollout_cls_row``.
    """
    blocks = iter(qk_last_first)
    q_last, k_last = next(blocks)
    row = 0.5 * cls_attention_row(q_last, k_last)
    row[:, 0] += 0.5  # e0 (0.5 S_L + 0.5 I)
    B, heads, N, _ = k_last.shape
    buffer = torch.empty(B, heads, N, N, device=k_last.device, dtype=torch.float32)
    for q, k in blocks:
        row = 0.5 * row_times_attention(row, q, k, buffer) + 0.5 * row
    return row


@torch.no_grad()
def rollout_cls_row(
    last_cls_row: torch.Tensor, earlier_maps_last_first: Iterable[torch.Tensor]
) -> torch.Tensor:
    """Class-token row of the attention rollout, Ŝ = S̄_L ⊗ ... ⊗ S̄_1 with S̄ = 0.5 S + 0.5 I.

    Args:
        last_cls_row: (B, N) class-token row of the head-averaged map S_L of the last block.
        earlier_maps_last_first: head-averaged maps S_{L-1}, ..., S_1, each (B, N, N). May be a
            generator, so a caller can build one map at a time.

    Returns:
        (B, N) the class-token row of Ŝ over all tokens (prefix tokens included).
    """
    row = 0.5 * last_cls_row.float()
    row[:, 0] += 0.5  # e0 (0.5 S_L + 0.5 I)
    for head_mean in earlier_maps_last_first:
        with fp32(row.device):
            row = 0.5 * torch.bmm(row.unsqueeze(1), head_mean.float()).squeeze(1) + 0.5 * row
    return row


def num_local_tokens(top_ratio: float, num_patches: int) -> int:
    """k = ceil(R * num_patches), at least one and at most all patches."""
    return min(num_patches, max(1, math.ceil(top_ratio * num_patches)))


def select_local_tokens(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, k) of the k patches with the highest score (rollout or one block's class row),
    highest first."""
    return scores.topk(k, dim=1).indices


def select_random_tokens(batch: int, num_patches: int, k: int, device: torch.device) -> torch.Tensor:
    """Indices (B, k) of k distinct patches per image, uniformly at random: the top k of uniform
    noise drawn on ``device`` from torch's generator (reproducible under its seed, no host sync)."""
    return torch.rand(batch, num_patches, device=device).topk(k, dim=1).indices
