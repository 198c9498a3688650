"""PWCA's pairs: every image of a training batch gets another image of the same batch as its
distractor, drawn as a uniformly random derangement on the batch's device (no host sync)."""

from __future__ import annotations

import torch

from ..errors import UsageError


def random_derangement(n: int, device: torch.device | str | None = None, tries: int = 32) -> torch.Tensor:
    """A uniformly random permutation of range(n) with no fixed point (n >= 2), drawn on ``device``
    without a host-device sync.

    ``tries`` uniform permutations are drawn at once and the first without a fixed point is kept
    (exact rejection sampling). Only if all of them have one, with probability at most 2^-tries
    (about (1 - 1/e)^tries for large n), a random rotation of the identity is used instead:
    still a derangement, and the choice is made on the device (``torch.where``), not the host.
    """
    perms = torch.rand(tries, n, device=device).argsort(dim=1)  # (tries, n) uniform permutations
    identity = torch.arange(n, device=device)
    valid = (perms != identity).all(dim=1)  # (tries,)
    first = valid.float().argmax()  # index of the first valid one (0 when none is)
    shift = torch.randint(1, n, (), device=device)
    rotation = (identity + shift) % n
    return torch.where(valid.any(), perms[first], rotation)


def pwca_pairs(batch_size: int, pair_index: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Each image's distractor for PWCA (B,): ``pair_index`` checked, or a random derangement
    drawn on ``device`` when it is None."""
    if batch_size < 2:
        raise UsageError(
            "PWCA pairs every image with another image of the same batch, so a training batch needs at "
            f"least 2 images (got {batch_size}). Use train.batch_size >= 2 with drop_last so no batch of "
            "1 is left over, or set model.pwca: false."
        )
    if pair_index is None:
        return random_derangement(batch_size, device)
    if pair_index.shape != (batch_size,) or pair_index.dtype != torch.long:
        raise ValueError(
            f"pair_index must be a LongTensor of shape ({batch_size},), got {pair_index.dtype} "
            f"{tuple(pair_index.shape)}"
        )
    if bool((pair_index < 0).any()) or bool((pair_index >= batch_size).any()):
        raise ValueError(
            f"pair_index values must index the batch, in [0, {batch_size}): {pair_index.tolist()}"
        )
    return pair_index.to(device)
