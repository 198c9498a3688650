"""One timm ``Block`` run as an SA, PWCA or GLCA step: the only module that reads Block and
Attention internals (norm1, attn.qkv, q_norm/k_norm, attn_drop, attn.norm, proj, proj_drop,
ls1/ls2, drop_path1/2, norm2, mlp).

Every step that carries a gradient runs fused attention, so no N x N attention matrix is kept
for autograd: ``F.scaled_dot_product_attention``, or for an SA step whose rollout is wanted the
same kernel through ``fused_lse.attention_with_lse``, which also returns each query's
log-sum-exp. The explicit softmax (``sa_block_with_map``) is the no-grad path for where no such
kernel exists: it materialises the maps for rollout. All of them, and rollout, take the softmax
scale from ``softmax_scale``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block

from .fused_lse import attention_with_lse


def softmax_scale(head_dim: int) -> float:
    """The attention logit scale 1 / sqrt(head_dim), the value of timm's ``Attention.scale``."""
    return head_dim**-0.5


def project_qkv(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project tokens to per-head queries, keys and values with timm's ``attn.qkv``.

    Args:
        attn: the timm ``Attention`` module whose weights are used.
        x: normalised tokens, (B, N, C).

    Returns:
        q, k, v, each (B, nh, N, hd), with timm's optional q/k norms applied.
    """
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, nh, N, hd) each
    return attn.q_norm(q), attn.k_norm(k), v


def project_q(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Queries only (B, nh, N, hd), from the query rows of ``attn.qkv``."""
    B, N, _ = x.shape
    dim = attn.num_heads * attn.head_dim
    bias = attn.qkv.bias[:dim] if attn.qkv.bias is not None else None
    q = F.linear(x, attn.qkv.weight[:dim], bias)
    return attn.q_norm(q.reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2))


def project_kv(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values only, each (B, nh, N, hd), from the key/value rows of ``attn.qkv`` (no
    wasted query projection)."""
    B, N, _ = x.shape
    dim = attn.num_heads * attn.head_dim
    bias = attn.qkv.bias[dim:] if attn.qkv.bias is not None else None
    kv = F.linear(x, attn.qkv.weight[dim:], bias)
    kv = kv.reshape(B, N, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)  # (B, nh, N, hd) each
    return attn.k_norm(k), v


def fused_attention(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale) v with the fused kernel, merged over heads.

    Args:
        q: (B, nh, Nq, hd). k, v: (B, nh, Nk, hd); Nk may differ from Nq (GLCA, PWCA).

    Returns:
        (B, Nq, nh * hd), before the output projection.
    """
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=softmax_scale(q.shape[-1]))
    return merge_heads(out)


def merge_heads(out: torch.Tensor) -> torch.Tensor:
    """(B, nh, Nq, hd) per-head attention outputs -> (B, Nq, nh * hd), timm's head order."""
    B, nh, Nq, hd = out.shape
    return out.transpose(1, 2).reshape(B, Nq, nh * hd)


def explicit_attention(
    attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with the softmax materialised, for use without autograd.

    Returns:
        out: (B, N, nh * hd) as ``fused_attention`` would give.
        head_mean: (B, N, N) the attention map averaged over heads, kept for rollout.
    """
    weights = (q * softmax_scale(q.shape[-1])) @ k.transpose(-2, -1)  # (B, nh, N, N)
    weights = weights.softmax(dim=-1)
    head_mean = weights.mean(dim=1)
    return merge_heads(attn.attn_drop(weights) @ v), head_mean


def block_tail(block: Block, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """Everything of a timm Block after attention: optional scale norm, output projection and
    dropout, layer scale, residual, then the MLP half with its residual.

    Args:
        x: (B, Nq, C) the block's input tokens for the query rows.
        attended: (B, Nq, nh * hd) attention output for those rows.
    """
    attn = block.attn
    x = x + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(attn.norm(attended)))))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def sa_block(
    block: Block, x: torch.Tensor, with_lse: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Self-attention block with fused attention: timm's ``Block.forward``.

    Args:
        x: (B, N, C).
        with_lse: also return each query's log-sum-exp (``fused_lse.attention_with_lse``; the
            caller has checked ``fused_lse.lse_available``).

    Returns:
        the block's output (B, N, C); its q, k, v, each (B, nh, N, hd): PWCA reuses k, v of the
        distractor and rollout recomputes the maps' rows from q, k; and lse (B, nh, N) float32
        without autograd, or None.
    """
    attn = block.attn
    q, k, v = project_qkv(attn, block.norm1(x))
    if not with_lse:
        return block_tail(block, x, fused_attention(attn, q, k, v)), q, k, v, None
    dropout = attn.attn_drop.p if attn.training else 0.0
    out, lse = attention_with_lse(q, k, v, softmax_scale(q.shape[-1]), dropout)  # (B, nh, N, hd)
    return block_tail(block, x, merge_heads(out)), q, k, v, lse


def sa_block_with_map(
    block: Block, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sa_block`` with the softmax materialised, for the no-grad path.

    Returns:
        the block's output (B, N, C), k and v (B, nh, N, hd), and the head-averaged attention
        map (B, N, N).
    """
    q, k, v = project_qkv(block.attn, block.norm1(x))
    attended, head_mean = explicit_attention(block.attn, q, k, v)
    return block_tail(block, x, attended), k, v, head_mean


def pwca_block(block: Block, pw: torch.Tensor, k2: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """Pair-wise cross-attention: ``pw``'s own queries over [own keys; k2] and [own values; v2]
    in one softmax, then the block's tail.

    Args:
        pw: (B, N, C) PWCA tokens.
        k2, v2: (B, nh, N2, hd) keys and values of each image's distractor.

    Returns:
        (B, N, C).
    """
    q, k, v = project_qkv(block.attn, block.norm1(pw))
    attended = fused_attention(block.attn, q, torch.cat([k, k2], dim=2), torch.cat([v, v2], dim=2))
    return block_tail(block, pw, attended)


def glca_block(block: Block, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Global-local cross-attention: ``queries`` attend to the tokens of ``context``.

    Queries are projected for the query tokens only, keys and values for the context only, and
    the attention output and MLP run on the query tokens alone.

    Args:
        queries: (B, Nq, C) the query tokens (prefix and/or selected patches of block L's input).
        context: (B, Nk, C) the key/value tokens (all of block L's input, or the selected ones).

    Returns:
        (B, Nq, C) the query tokens after the block.
    """
    k, v = project_kv(block.attn, block.norm1(context))  # (B, nh, Nk, hd)
    q = project_q(block.attn, block.norm1(queries))  # (B, nh, Nq, hd)
    return block_tail(block, queries, fused_attention(block.attn, q, k, v))


@torch.no_grad()
def queries_keys(block: Block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k (B, nh, N, hd) of block input ``x``, without autograd: rollout recomputes them
    when checkpointing did not keep them."""
    q, k, _ = project_qkv(block.attn, block.norm1(x))
    return q, k
