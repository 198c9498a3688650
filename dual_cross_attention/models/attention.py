"""Attention helpers shared by the SA, GLCA and PWCA streams.

Everything that carries a gradient goes through ``F.scaled_dot_product_attention`` so that no
N x N attention matrix is kept for autograd. Explicit (softmax) attention is used only where
the maps themselves are wanted and no gradient flows: inference, where the maps are reused
for attention rollout instead of being recomputed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from timm.layers import Attention


def project_qkv(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project tokens to per-head queries, keys and values with timm's ``attn.qkv``.

    Args:
        attn: the timm ``Attention`` module whose weights are used.
        x: normalised tokens, (B, N, C).

    Returns:
        q, k, v, each (B, heads, N, head_dim), with timm's optional q/k norms applied.
    """
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, nh, N, hd) each
    return attn.q_norm(q), attn.k_norm(k), v


def project_kv(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values only, from the key/value rows of ``attn.qkv`` (no wasted query projection)."""
    B, N, _ = x.shape
    dim = attn.num_heads * attn.head_dim
    bias = attn.qkv.bias[dim:] if attn.qkv.bias is not None else None
    kv = F.linear(x, attn.qkv.weight[dim:], bias)
    kv = kv.reshape(B, N, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)  # (B, nh, N, hd) each
    return attn.k_norm(k), v


def project_q(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Queries only, from the query rows of ``attn.qkv``."""
    B, N, _ = x.shape
    dim = attn.num_heads * attn.head_dim
    bias = attn.qkv.bias[:dim] if attn.qkv.bias is not None else None
    q = F.linear(x, attn.qkv.weight[:dim], bias)
    return attn.q_norm(q.reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2))


def fused_attention(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with the fused kernel, merged over heads.

    Args:
        q: (B, nh, Nq, hd). k, v: (B, nh, Nk, hd); Nk may differ from Nq (GLCA, PWCA).

    Returns:
        (B, Nq, C), before timm's output projection.
    """
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    B, nh, Nq, hd = out.shape
    return out.transpose(1, 2).reshape(B, Nq, nh * hd)


def explicit_attention(
    attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with the softmax materialised, for use without autograd.

    Returns:
        out: (B, N, C) as ``fused_attention`` would give.
        head_mean: (B, N, N) the attention map averaged over heads, kept for rollout.
    """
    weights = (q * attn.scale) @ k.transpose(-2, -1)  # (B, nh, N, N)
    weights = weights.softmax(dim=-1)
    head_mean = weights.mean(dim=1)
    out = attn.attn_drop(weights) @ v  # (B, nh, N, hd)
    B, nh, N, hd = out.shape
    return out.transpose(1, 2).reshape(B, N, nh * hd), head_mean


def output_projection(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """timm's post-attention path: optional scale norm, projection, dropout."""
    return attn.proj_drop(attn.proj(attn.norm(x)))


@torch.no_grad()
def attention_map(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Head-averaged softmax(q k^T / sqrt(d)) in float32, without autograd.

    Args:
        q: (B, nh, Nq, hd); k: (B, nh, N, hd).

    Returns:
        (B, Nq, N).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q.float() * scale) @ k.float().transpose(-2, -1)  # (B, nh, Nq, N)
    return scores.softmax(dim=-1).mean(dim=1)


@torch.no_grad()
def row_times_attention(
    row: torch.Tensor, q: torch.Tensor, k: torch.Tensor, buffer: torch.Tensor
) -> torch.Tensor:
    """row @ mean_h softmax(q_h k_h^T / sqrt(d)), without forming the normalised map.

    Uses row @ softmax(S) = (row / Z) @ exp(S - max) per head, computed in place in ``buffer``,
    so each block costs one matmul, one exp and one reduction (the training-path rollout
    recomputes these maps for every block).

    Args:
        row: (B, N) float32. q, k: (B, nh, N, hd). buffer: (B, nh, N, N) float32 scratch space.

    Returns:
        (B, N) float32.
    """
    heads = q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1])
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
    row = 0.5 * attention_map(q_last[:, :, :1], k_last)[:, 0]  # only the class-token query is needed
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

    Only the class-token row is needed, so a row vector is multiplied through the maps from
    the last block down; no N x N x N matrix chain is ever formed.

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
        row = 0.5 * torch.bmm(row.unsqueeze(1), head_mean.float()).squeeze(1) + 0.5 * row
    return row


def num_local_tokens(top_ratio: float, num_patches: int) -> int:
    """k = ceil(R * num_patches), at least one and at most all patches."""
    return min(num_patches, max(1, math.ceil(top_ratio * num_patches)))


def select_local_tokens(rollout: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, k) of the k patches with the highest rollout score, highest first."""
    return rollout.topk(k, dim=1).indices
