"""Batch-hard triplet loss against a loop over the batch, and mined over two processes' batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from retrieval_ddp_worker import spawn_two, triplet_batch, triplet_worker

from dual_cross_attention.retrieval.triplet import batch_hard_triplet_loss, global_batch_hard_triplet_loss


def loop_loss(features: torch.Tensor, labels: list[int], margin: float, soft_margin: bool) -> torch.Tensor:
    """For each anchor, every positive and negative pair by hand; anchors lacking either are skipped."""
    losses = []
    for a in range(len(labels)):
        positives = [
            torch.dist(features[a], features[p])
            for p in range(len(labels))
            if p != a and labels[p] == labels[a]
        ]
        negatives = [
            torch.dist(features[a], features[n]) for n in range(len(labels)) if labels[n] != labels[a]
        ]
        if not positives or not negatives:
            continue
        gap = torch.stack(positives).max() - torch.stack(negatives).min()
        losses.append(F.softplus(gap) if soft_margin else torch.clamp(gap + margin, min=0))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("soft_margin", [False, True])
def test_matches_a_loop_over_the_batch(soft_margin):
    labels = [0, 0, 1, 1, 1, 2, 2, 3]  # identity 3 has no positive: it is no anchor
    features = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.7
    got_input, ref_input = features.clone().requires_grad_(), features.clone().requires_grad_()
    got = batch_hard_triplet_loss(got_input, torch.tensor(labels), margin=0.5, soft_margin=soft_margin)
    expected = loop_loss(ref_input, labels, margin=0.5, soft_margin=soft_margin)
    torch.testing.assert_close(got, expected)
    assert expected > 0  # the margin is active for some anchors
    got.backward()
    expected.backward()
    torch.testing.assert_close(got_input.grad, ref_input.grad)


def test_easy_batch_costs_nothing_and_a_batch_of_one_identity_has_no_anchor():
    features = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [5.1, 0.0]], requires_grad=True)
    assert batch_hard_triplet_loss(features, torch.tensor([0, 0, 1, 1]), margin=0.3) == 0
    alone = batch_hard_triplet_loss(features, torch.tensor([2, 2, 2, 2]))
    assert alone == 0
    alone.backward()  # still a graph, so every process of a DDP run takes part in backward
    assert features.grad.abs().sum() == 0


def test_global_loss_in_one_process_is_the_plain_loss():
    features, labels = torch.randn(8, 4), torch.tensor([0, 1] * 4)
    assert global_batch_hard_triplet_loss(features, labels) == batch_hard_triplet_loss(features, labels)


def test_two_processes_of_8_equal_one_of_16(tmp_path):
    spawn_two(triplet_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    inputs, labels, layer = triplet_batch()
    for soft_margin in (False, True):
        layer.zero_grad()
        features = layer(inputs)
        features.retain_grad()
        loss = batch_hard_triplet_loss(features, labels, margin=0.3, soft_margin=soft_margin)
        loss.backward()
        got = [rank[soft_margin] for rank in ranks]
        torch.testing.assert_close((got[0]["loss"] + got[1]["loss"]) / 2, loss.detach())
        # Each process holds its features' gradient from both losses; DDP then averages over 2.
        feature_grad = torch.cat([got[0]["feature_grad"], got[1]["feature_grad"]]) / 2
        torch.testing.assert_close(feature_grad, features.grad)
        for rank in got:
            torch.testing.assert_close(rank["weight_grad"], layer.weight.grad)
            torch.testing.assert_close(rank["bias_grad"], layer.bias.grad)
    # Mining crossed processes: a process alone would have found other hardest pairs.
    local = batch_hard_triplet_loss(layer(inputs[:8]), labels[:8], margin=0.3)
    assert not torch.isclose(local, ranks[0][False]["loss"])
