"""PK batches for metric learning: P identities x K images each, split across processes.

The triplet loss needs positives and negatives inside every batch, which uniform sampling does
not give; a PK batch has K images of each of P identities. As with the identity sampler of the
Re-ID recipes we follow (BoT, TransReID, DCAL), an epoch goes through every training image about
once, not every identity once: each identity's images are shuffled and cut into chunks of K, and
the chunks are dealt into steps of P * world_size chunks of distinct identities; each process
takes its own P chunks of each step. Every rank computes the same global plan from (seed, epoch)
alone, so ranks never share an identity within a step. The number of steps is a fixed function
of the dataset, the same every epoch, because the LR schedule is laid out from ``len(loader)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from ..errors import UsageError


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise UsageError(f"PKBatchSampler: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class PKBatchSampler(Sampler[list[int]]):
    """Batches of P distinct identities x K images, for ``DataLoader(batch_sampler=...)``.

    Chunks: an identity with n >= K images is shuffled and cut into ceil(n / K) chunks of K; a
    last partial chunk of r < K images is completed with K - r of the identity's other images
    (drawn without replacement), so every chunk is K distinct images and no image is left out.
    An identity with n < K images gives one chunk: all n images plus K - n drawn with replacement.

    Steps: ``len()`` is S = ceil(sum over identities of ceil(n / K) / (P * world_size)), the same
    every epoch and on every rank. An identity is in a step at most once, so one with more than S
    chunks contributes only S of them (its other images, random each epoch, sit the epoch out).
    Each step draws its identities among those with chunks left, weighted by the chunks they have
    left (so it is chunks, not identities, that are drawn evenly), always taking those with a chunk
    left for every remaining step; that way every chunk finds a step. A step that runs out of such
    identities is topped up with other identities drawn uniformly, one fresh chunk each: S * P *
    world_size - sum(min(ceil(n / K), S)) top-up chunks an epoch, fewer than P * world_size unless
    an identity was cut to S chunks.

    So every epoch visits every identity, in at least min(ceil(n / K), S) steps, and shows at least
    min(n, S * K) distinct images of it: all of them unless it has more than S * K. Call
    ``set_epoch`` before each epoch, as with ``DistributedSampler``.

    Args:
        pids: the identity of each dataset index (e.g. ``ReIDDataset.pids``).
        P: identities per batch per process (>= 2, so every anchor has negatives).
        K: images per identity (>= 2, so every anchor has a positive).
        seed: base seed (>= 0); the order depends only on (seed, epoch), not on the rank.
        rank: this process's index in [0, world_size).
        world_size: number of processes sharing each step.
    """

    def __init__(
        self,
        pids: Sequence[int] | np.ndarray,
        P: int,
        K: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self.P = _check_int("P", P, 2)
        self.K = _check_int("K", K, 2)
        self.seed = _check_int("seed", seed, 0)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise UsageError(f"PKBatchSampler: rank must be in [0, {self.world_size}), got {rank}")
        labels = np.asarray(pids, dtype=np.int64)
        if labels.ndim != 1 or labels.size == 0:
            raise UsageError(
                f"PKBatchSampler: pids must be a non-empty 1-D sequence, got shape {labels.shape}"
            )
        self.identities, inverse = np.unique(labels, return_inverse=True)
        sizes = np.bincount(inverse)
        # members[i]: the dataset indices of identity i, ascending.
        self.members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(sizes)[:-1])
        self.step_size = self.P * self.world_size
        if len(self.identities) < self.step_size:
            raise UsageError(
                f"PK sampling needs at least P x world_size = {self.P} x {self.world_size} = "
                f"{self.step_size} training identities, so that the identities of a step are distinct, "
                f"but there are {len(self.identities)}; lower P or use fewer processes"
            )
        self.chunks_per_identity = -(-sizes // self.K)  # ceil(n / K), >= 1
        self.steps = math.ceil(int(self.chunks_per_identity.sum()) / self.step_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` for the next iteration (the same on every rank)."""
        self.epoch = _check_int("epoch", epoch, 0)

    def __len__(self) -> int:
        return self.steps

    def _chunks(self, rng: np.random.Generator, identity: int) -> np.ndarray:
        """Identity's images in a random order as a (ceil(n / K), K) array of chunks."""
        images = rng.permutation(self.members[identity])
        n, partial = len(images), len(images) % self.K
        if n < self.K:
            fill = rng.choice(images, size=self.K - n, replace=True)
        elif partial:  # complete the last chunk from the images of the full chunks before it
            fill = rng.choice(images[: n - partial], size=self.K - partial, replace=False)
        else:
            fill = images[:0]
        return np.concatenate([images, fill]).reshape(-1, self.K)

    def global_steps(self) -> list[np.ndarray]:
        """The epoch's plan for all ranks: per step, a (world_size, P * K) array of dataset indices.

        Row r is rank r's batch: identity after identity, K indices each. The plan depends on
        P * world_size, not on how it splits, so a single process with P * world_size identities
        per batch gets the same steps, concatenated.
        """
        rng = np.random.default_rng([self.seed, self.epoch])
        chunks = [self._chunks(rng, i)[: self.steps] for i in range(len(self.identities))]
        left = np.array([len(c) for c in chunks])
        everyone = np.arange(len(chunks))
        steps = []
        for step in range(self.steps):
            steps_left = self.steps - step
            # Invariant: each identity has at most steps_left chunks left and all of them fit in
            # steps_left * step_size slots. Taking the identities at the bound keeps the first
            # part; taking as many identities with chunks left as the step holds keeps the second.
            forced = np.flatnonzero(left == steps_left)
            free = np.flatnonzero((left > 0) & (left < steps_left))
            take = min(self.step_size - len(forced), len(free))
            weights = left[free] / left[free].sum() if take else None
            chosen = np.concatenate([forced, rng.choice(free, size=take, replace=False, p=weights)])
            row = [chunks[i][len(chunks[i]) - left[i]] for i in chosen]
            left[chosen] -= 1
            extra = rng.choice(
                np.setdiff1d(everyone, chosen), size=self.step_size - len(chosen), replace=False
            )
            row += [self._chunks(rng, i)[0] for i in extra]
            # Shuffled so that the forced (large) identities do not all land on rank 0.
            row = np.stack(row)[rng.permutation(self.step_size)]
            steps.append(row.reshape(self.world_size, self.P * self.K))
        return steps

    def __iter__(self) -> Iterator[list[int]]:
        for step in self.global_steps():
            yield step[self.rank].tolist()

    def __repr__(self) -> str:
        return (
            f"PKBatchSampler(P={self.P}, K={self.K}, {len(self.identities)} identities, "
            f"rank {self.rank}/{self.world_size}, {len(self)} steps)"
        )
