"""PKBatchSampler: P distinct identities x K images, every image about once per epoch, disjoint ranks."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from dual_cross_attention.data.pk_sampler import PKBatchSampler
from dual_cross_attention.errors import UsageError

# 7 identities: ids 10..16 with 1, 2, 3, 4, 5, 6, 7 images, shuffled in dataset order.
COUNTS = {10 + i: i + 1 for i in range(7)}
PIDS = np.random.default_rng(0).permutation([pid for pid, n in COUNTS.items() for _ in range(n)])


def market_like_pids():
    """751 identities with 2..~70 images each, 12,936 in all, like the Market-1501 training split."""
    rng = np.random.default_rng(0)
    weights = rng.gamma(2.0, size=751)
    counts = 2 + rng.multinomial(12936 - 2 * 751, weights / weights.sum())
    return rng.permutation(np.repeat(np.arange(751), counts))


def expected_steps(pids, K, step_size):
    """The documented rule, from the counts alone: ceil(sum of ceil(n / K) / step_size)."""
    chunks = sum(-(-n // K) for n in Counter(pids.tolist()).values())
    return -(-chunks // step_size)


def identities(batch, pids=PIDS):
    return Counter(int(pids[i]) for i in batch)


def epoch_batches(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("P,K", [(2, 2), (3, 4), (7, 2)])
def test_every_batch_is_p_identities_times_k(P, K):
    sampler = PKBatchSampler(PIDS, P=P, K=K, seed=1)
    for epoch in range(3):
        batches = epoch_batches(sampler, epoch)
        assert len(batches) == len(sampler) == expected_steps(PIDS, K, P)
        for batch in batches:
            assert len(batch) == P * K
            assert sorted(identities(batch).values()) == [K] * P  # exactly P distinct ids, K each
            for start in range(0, P * K, K):  # identity after identity
                assert len({PIDS[i] for i in batch[start : start + K]}) == 1


def test_len_is_fixed_across_epochs_and_counts_the_batches():
    pids = market_like_pids()
    sampler = PKBatchSampler(pids, P=16, K=4, seed=0)
    assert len(sampler) == expected_steps(pids, 4, 16) == 220  # vs 47 when visiting each identity once
    for epoch in range(3):
        assert len(epoch_batches(sampler, epoch)) == len(sampler)


@pytest.mark.parametrize("pids,P,K", [(PIDS, 3, 2), (PIDS, 2, 4), (market_like_pids(), 16, 4)])
def test_every_identity_and_its_images_are_visited_each_epoch(pids, P, K):
    sampler = PKBatchSampler(pids, P=P, K=K, seed=5)
    counts = Counter(pids.tolist())
    for epoch in range(3):
        batches = epoch_batches(sampler, epoch)
        steps_with = Counter(pid for b in batches for pid in identities(b, pids))
        assert set(steps_with) == set(counts)
        seen = {pid: set() for pid in counts}
        for i in {i for b in batches for i in b}:
            seen[int(pids[i])].add(i)
        for pid, n in counts.items():
            assert steps_with[pid] >= min(-(-n // K), len(sampler))
            assert len(seen[pid]) >= min(n, len(sampler) * K)  # all n: none has more than len() * K


def test_exact_fit_shows_every_image_exactly_once():
    pids = np.repeat(np.arange(8), 4)  # 2 chunks of 2 each, 16 chunks = 4 steps of 4: no top-ups
    sampler = PKBatchSampler(pids, P=4, K=2, seed=2)
    for epoch in range(3):
        indices = [i for b in epoch_batches(sampler, epoch) for i in b]
        assert sorted(indices) == list(range(len(pids)))


def test_chunks_are_distinct_images_or_all_images_with_repeats():
    sampler = PKBatchSampler(PIDS, P=7, K=4, seed=0)
    for epoch in range(5):
        for batch in epoch_batches(sampler, epoch):
            for start in range(0, len(batch), 4):
                group = batch[start : start + 4]
                pid = int(PIDS[group[0]])
                own = set(np.flatnonzero(np.equal(PIDS, pid)).tolist())
                if COUNTS[pid] >= 4:
                    assert len(set(group)) == 4 and set(group) <= own  # distinct images
                else:
                    assert set(group) == own  # all of them, repeats are unavoidable
    batch = epoch_batches(sampler, 0)[0]  # P = 7: every batch holds every identity
    only = int(np.flatnonzero(np.equal(PIDS, 10))[0])
    assert batch.count(only) == 4  # the single-image identity shows the repeat explicitly


def test_identity_with_more_chunks_than_steps_is_in_every_step():
    pids = np.array([0] * 40 + [1, 1, 2, 2, 3, 3, 4, 4])  # 20 + 4 chunks of 2 -> 12 steps of 2
    sampler = PKBatchSampler(pids, P=2, K=2, seed=4)
    assert len(sampler) == 12
    for epoch in range(3):
        batches = epoch_batches(sampler, epoch)
        assert all(0 in identities(b, pids) for b in batches)
        big = {i for b in batches for i in b if pids[i] == 0}
        assert len(big) == len(sampler) * 2  # its 12 chunks are 24 distinct of its 40 images
        assert {pid for b in batches for pid in identities(b, pids)} == set(range(5))
    assert epoch_batches(sampler, 0) != epoch_batches(sampler, 1)  # which 24 changes with the epoch


def test_same_seed_and_epoch_same_order_otherwise_different():
    a, b = PKBatchSampler(PIDS, 2, 3, seed=7), PKBatchSampler(PIDS, 2, 3, seed=7)
    assert epoch_batches(a, 4) == epoch_batches(b, 4)
    assert list(a) == list(a)  # iterating again without set_epoch repeats the epoch
    assert epoch_batches(a, 4) != epoch_batches(a, 5)
    assert epoch_batches(a, 4) != epoch_batches(PKBatchSampler(PIDS, 2, 3, seed=8), 4)


def test_two_ranks_split_the_single_process_plan():
    pids = np.repeat(np.arange(11), 3)  # 11 ids x 2 chunks of 2 = 22 chunks, steps of 2 x 2: 6 steps
    ranks = [PKBatchSampler(pids, P=2, K=2, seed=9, rank=r, world_size=2) for r in range(2)]
    single = PKBatchSampler(pids, P=4, K=2, seed=9)
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 6
    for epoch in range(3):
        steps = list(zip(*(epoch_batches(s, epoch) for s in ranks), strict=True))
        for (batch0, batch1), whole in zip(steps, epoch_batches(single, epoch), strict=True):
            ids0, ids1 = identities(batch0, pids), identities(batch1, pids)
            assert len(ids0) == len(ids1) == 2 and not set(ids0) & set(ids1)
            assert batch0 + batch1 == whole
        assert {pid for step in steps for b in step for pid in identities(b, pids)} == set(range(11))
    # every rank computes the same global plan
    assert all(
        np.array_equal(x, y) for x, y in zip(ranks[0].global_steps(), ranks[1].global_steps(), strict=True)
    )


def test_usable_as_dataloader_batch_sampler():
    data = torch.utils.data.TensorDataset(torch.arange(len(PIDS)), torch.as_tensor(PIDS))
    loader = torch.utils.data.DataLoader(data, batch_sampler=PKBatchSampler(PIDS, P=2, K=3, seed=0))
    batches = list(loader)
    assert len(batches) == len(loader) == expected_steps(PIDS, 3, 2) == 6
    for index, pid in batches:
        assert index.shape == (6,) and sorted(Counter(pid.tolist()).values()) == [3, 3]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(P=1, K=4), "P must be an integer >= 2"),
        (dict(P=2, K=1), "K must be an integer >= 2"),
        (dict(P=4, K=2, world_size=2), "at least P x world_size = 4 x 2 = 8"),
        (dict(P=2, K=2, rank=2, world_size=2), "rank must be in"),
        (dict(P=2, K=2, seed=-1), "seed"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(UsageError, match=match):
        PKBatchSampler(PIDS, **kwargs)
    with pytest.raises(UsageError, match="non-empty"):
        PKBatchSampler([], P=2, K=2)
