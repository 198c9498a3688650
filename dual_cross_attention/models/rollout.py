"""Attention rollout of the class token and the choice of GLCA's local queries (by rollout, by
the last block's map alone, or at random).

Only the class-token row of the rollout is needed, so a row vector is multiplied through the
head-averaged maps from the last block down; no N x N x N matrix chain is formed. From queries
and keys (``rollout_from_qk``) no N x N map is formed either: row r times softmax(S) is summed
over tiles of query rows, (r A)_j = sum_i r_i exp(S_ij - lse_i), each tile of bounded size
(``fused_lse.TILE_ELEMENTS``), with lse_i the log-sum-exp the fused forward kept. (A second
fused SDPA call with queries and keys swapped gives the same sums as its log-sum-exp, but the
kernel needs values of the full head size, so half its work is a product with zeros: tiles do
half the FLOPs. Measured at 448 px, batch 4, SA+GLCA over plain-ViT images/s, DeiT-Tiny /
ViT-Base, idle 2-core CPU: 2-MiB tiles of 256 rows 0.73-0.74x / 0.84-0.85x; whole-map 16-MiB
tiles 0.69-0.74x / 0.70-0.81x; swapped call 0.69x / 0.79x.) Nothing here
carries a gradient, and everything is computed in float32 with autocast off: under bf16/fp16
autocast a matmul of float32 inputs would otherwise run (and return) in the low precision,
which moves the scores by about 1e-3 and can change which patches GLCA selects.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .blocks import softmax_scale
from .fused_lse import tile_elements

# Query rows per rollout tile. With 2-MiB tiles (fused_lse.TILE_ELEMENTS) of 256 rows, one block's
# row_times_attention at 448 px, batch 4, took 9.3 / 42.9 ms (DeiT-Tiny / ViT-Base, median of 15
# / 9 interleaved calls on an idle 2-core CPU) where whole-map 16-MiB tiles with lse appended to
# the queries took 11.9 / 64.8 ms; 64 or 16 rows, or 8-MiB tiles, were in between or slower.
TILE_ROWS = 256


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
    row: torch.Tensor, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor | None = None
) -> torch.Tensor:
    """row @ mean_h softmax(q_h k_h^T * scale), a tile of query rows at a time (no N x N tensor).

    A tile holds the scores of some query rows i against all keys, for some of the B x nh maps;
    exp(S_ij - lse_i) is then that tile of the normalised map, and row_i / nh times it adds the
    tile's share of the result. With lse the shift is the score matmul's own additive term
    (``baddbmm`` with -lse_i broadcast along the row), so a tile costs three ops: matmul, exp,
    row-vector product. With float32 queries the forward kernel's lse is exact to float32
    rounding and is used as it is; without lse, or when it came from low-precision q/k (bf16 CPU
    flash: up to 7e-5 off), each row is shifted by its maximum or by that lse and divided by its
    own sum in the tile, which makes it exactly normalised.

    Args:
        row: (B, N) float32. q, k: (B, nh, N, hd), any layout. lse: (B, nh, N) or None.

    Returns:
        (B, N) float32.
    """
    B, nh, N, hd = q.shape
    exact = lse is not None and q.dtype == torch.float32
    with fp32(q.device):
        qs = q.float().reshape(B * nh, N, hd) * softmax_scale(hd)  # (B nh, N, hd)
        kt = k.float().reshape(B * nh, N, hd).transpose(1, 2)  # (B nh, hd, N)
        shift = None if lse is None else lse.float().reshape(B * nh, N, 1).neg()  # (B nh, N, 1)
        weights = (row.float() / nh).repeat_interleave(nh, dim=0).unsqueeze(1)  # (B nh, 1, N)
        out = torch.zeros(B * nh, 1, N, device=q.device, dtype=torch.float32)
        rows, maps = tile_shape(q.device, B * nh, N)
        for g in range(0, B * nh, maps):
            m = slice(g, g + maps)
            for i in range(0, N, rows):
                r = slice(i, i + rows)
                if shift is None:
                    tile = torch.bmm(qs[m, r], kt[m])  # (maps, rows, N) scores
                    tile.sub_(tile.amax(dim=-1, keepdim=True))
                else:
                    tile = torch.baddbmm(shift[m, r], qs[m, r], kt[m])  # scores minus lse
                tile.exp_()
                w = weights[m, :, r] if exact else weights[m, :, r] / tile.sum(dim=-1).unsqueeze(1)
                torch.baddbmm(out[m], w, tile, out=out[m])  # += (maps, 1, N); counted by FLOP counters
        return out.view(B, nh, N).sum(dim=1)


def tile_shape(device: torch.device, num_maps: int, N: int) -> tuple[int, int]:
    """(query rows, maps) per tile of ``row_times_attention``: up to ``TILE_ROWS`` rows of as
    many of the ``num_maps`` maps as fit in ``fused_lse.tile_elements`` score elements (fewer rows
    of one map where even those do not fit)."""
    budget = tile_elements(device)
    rows = max(1, min(N, TILE_ROWS, budget // N))
    return rows, max(1, min(num_maps, budget // (rows * N)))


@torch.no_grad()
def rollout_from_qk(blocks_last_first: Iterable[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """Class-token rollout row from per-block queries and keys, last block first, without any
    N x N tensor: ``row_times_attention`` for every block below the last.

    Args:
        blocks_last_first: (q, k) or (q, k, lse) of blocks L, L-1, ..., 1; q, k (B, nh, N, hd),
            lse (B, nh, N) from the fused forward or None. May be a generator.

    Returns:
        (B, N) as ``rollout_cls_row``.
    """
    blocks = iter(blocks_last_first)
    q_last, k_last, *_ = next(blocks)
    row = 0.5 * cls_attention_row(q_last, k_last)
    row[:, 0] += 0.5  # e0 (0.5 S_L + 0.5 I)
    for q, k, *lse in blocks:
        row = 0.5 * row_times_attention(row, q, k, *lse) + 0.5 * row
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
