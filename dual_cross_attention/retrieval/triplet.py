"""Batch-hard triplet loss (Hermans et al. 2017, "In Defense of the Triplet Loss"), in one process
or mined over the global batch of all processes.

For every anchor a: d_ap = the largest euclidean distance to another sample of its identity, d_an =
the smallest to a sample of another identity; loss_a = max(0, d_ap - d_an + margin), or
softplus(d_ap - d_an) with ``soft_margin``. The loss is the mean over the anchors that have both
(with P x K sampling, K >= 2, every anchor does); a batch without any such anchor gives 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .gather import gather_variable, gather_variable_with_sizes


def batch_hard_triplet_loss(
    features: torch.Tensor, labels: torch.Tensor, margin: float = 0.3, soft_margin: bool = False
) -> torch.Tensor:
    """Mean batch-hard triplet loss of ``features`` (B, D) with identity ``labels`` (B,).

    Args:
        features: (B, D) embeddings (not normalised here).
        labels: (B,) integer identities.
        margin: the hinge margin; unused with ``soft_margin``.
        soft_margin: softplus(d_ap - d_an) instead of the hinge.
    """
    return _mined_loss(features, labels, features, labels, 0, margin, soft_margin)


def global_batch_hard_triplet_loss(
    features: torch.Tensor, labels: torch.Tensor, margin: float = 0.3, soft_margin: bool = False
) -> torch.Tensor:
    """Batch-hard triplet loss of this process's anchors, mined over every process's batch.

    All features are gathered with autograd (``gather_variable``): each process's loss reaches
    the features of the process that owns them, summed over processes. DDP averages parameter
    gradients over the W processes, so with equal numbers of anchors per process the gradient is
    that of ``batch_hard_triplet_loss`` on the concatenated batch, and so is the loss averaged over
    processes. Without torch.distributed (or with one process) this is ``batch_hard_triplet_loss``.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return batch_hard_triplet_loss(features, labels, margin, soft_margin)
    everyone, rows = gather_variable_with_sizes(features)
    everyone_labels = gather_variable(labels)
    offset = sum(rows[: dist.get_rank()])
    return _mined_loss(features, labels, everyone, everyone_labels, offset, margin, soft_margin)


def _mined_loss(
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    pool: torch.Tensor,
    pool_labels: torch.Tensor,
    offset: int,
    margin: float,
    soft_margin: bool,
) -> torch.Tensor:
    """Anchors are rows offset..offset+A of ``pool``; hardest positive and negative are mined in it."""
    anchors_in_pool = pool[offset : offset + len(anchors)]  # the gathered copy carries the gradient back
    dist_sq = (
        anchors_in_pool.square().sum(1, keepdim=True)
        + pool.square().sum(1)[None, :]
        - 2.0 * anchors_in_pool @ pool.T
    )  # (A, P)
    distance = dist_sq.clamp_min(1e-12).sqrt()  # the clamp keeps sqrt's gradient finite at 0
    same = anchor_labels[:, None] == pool_labels[None, :]
    anchor_index = torch.arange(offset, offset + len(anchors), device=pool.device)
    itself = anchor_index[:, None] == torch.arange(len(pool), device=pool.device)[None, :]
    positive, negative = same & ~itself, ~same
    valid = positive.any(1) & negative.any(1)  # (A,)
    hardest_pos = torch.where(positive, distance, float("-inf")).amax(1)
    hardest_neg = torch.where(negative, distance, float("inf")).amin(1)
    # Anchors without a triplet get a finite stand-in and weight 0, rather than a branch on
    # valid.any() (a GPU sync): the loss keeps its graph through the gather either way, which
    # every process's backward needs, since the gather's backward is an all-reduce.
    gap = torch.where(valid, hardest_pos - hardest_neg, 0.0)
    per_anchor = F.softplus(gap) if soft_margin else F.relu(gap + margin)
    return (per_anchor * valid).sum() / valid.sum().clamp_min(1)
