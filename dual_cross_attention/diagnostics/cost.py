"""Deterministic cost figures of a training step: FLOPs and bytes saved for backward.

Both are exact counts, not timings, so checks and tests may assert them as ratios against the
plain timm ViT. FLOPs are counted under the math SDPA backend because ``FlopCounterMode``
cannot see the CPU flash kernel and would hide the attention cost. ``measure_costs`` is the one
sequence that counts a step; ``test_fixes.py``, ``benchmarks/bench_model.py`` and the tests all
read their figures from the ``StepCosts`` it returns.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import astuple, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ..models.dual_vit import DualViT


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of everything ``fn`` runs (forward and, if it calls it, backward), math attention."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def saved_bytes(forward: Callable[[], torch.Tensor]) -> int:
    """Bytes autograd keeps for backward while ``forward`` builds its graph: unique storages, so
    views of one tensor count once. Parameters saved by linear layers are included."""
    storages: dict[int, torch.UntypedStorage] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage  # holding it keeps the address from being reused
        # Detached: returning the tensor itself ties outputs saved by their own node into a
        # reference cycle through the autograd graph, which leaks the activations of every call.
        return tensor.detach()

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = forward()
    total = sum(s.nbytes() for s in storages.values())
    del loss
    return total


def dcal_loss(model: DualViT, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Unweighted sum of the branch cross-entropies: the cost of a DCAL step, not its training loss."""
    out = model(images)
    logits = [t for t in (out.sa_logits, out.glca_logits, out.pwca_logits) if t is not None]
    return sum(F.cross_entropy(t, labels) for t in logits)


def plain_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(images), labels)


def plain_vit_like(model: DualViT) -> nn.Module:
    """The timm ViT that ``model`` drives, alone: the baseline every ratio is taken against."""
    return copy.deepcopy(model.backbone)


@dataclass(frozen=True)
class StepCosts:
    """Exact cost counts of one training step (and one inference) of a DCAL model and of its plain
    ViT, same batch. Every field grows linearly with the number of blocks (all blocks cost the
    same; GLCA is one extra block), which is what lets ``extrapolate_costs`` scale them."""

    dcal_train_flops: float
    plain_train_flops: float
    dcal_saved_bytes: float
    plain_saved_bytes: float
    dcal_checkpointed_bytes: float  # DCAL with activation checkpointing
    dcal_inference_flops: float
    plain_inference_flops: float

    def ratios(self) -> dict[str, float]:
        """DCAL over the plain ViT (train-step FLOPs, saved bytes, inference FLOPs), and DCAL's
        saved bytes with activation checkpointing over those without."""
        return {
            "train_flops": self.dcal_train_flops / self.plain_train_flops,
            "saved_bytes": self.dcal_saved_bytes / self.plain_saved_bytes,
            "checkpointed": self.dcal_checkpointed_bytes / self.dcal_saved_bytes,
            "inference_flops": self.dcal_inference_flops / self.plain_inference_flops,
        }


def measure_costs(model: DualViT, images: torch.Tensor, labels: torch.Tensor) -> StepCosts:
    """Train-step FLOPs, saved bytes (without and with checkpointing) and inference FLOPs of
    ``model`` and of its plain ViT on one batch. Leaves ``model`` in training mode without
    gradients and with its own ``grad_checkpointing`` setting."""
    plain = plain_vit_like(model)
    plain.train()
    model.train()
    was = model.grad_checkpointing
    try:
        model.grad_checkpointing = False
        dcal_train = count_flops(lambda: dcal_loss(model, images, labels).backward())
        dcal_bytes = saved_bytes(lambda: dcal_loss(model, images, labels))
        model.grad_checkpointing = True
        checkpointed = saved_bytes(lambda: dcal_loss(model, images, labels))
    finally:
        model.grad_checkpointing = was
    plain_train = count_flops(lambda: plain_loss(plain, images, labels).backward())
    plain_bytes = saved_bytes(lambda: plain_loss(plain, images, labels))
    model.eval()
    plain.eval()
    with torch.no_grad():
        dcal_inference = count_flops(lambda: model(images))
        plain_inference = count_flops(lambda: plain(images))
    model.train()
    model.zero_grad(set_to_none=True)
    return StepCosts(
        dcal_train, plain_train, dcal_bytes, plain_bytes, checkpointed, dcal_inference, plain_inference
    )


def extrapolate_costs(one_block: StepCosts, two_blocks: StepCosts, depth: int) -> StepCosts:
    """The costs at ``depth`` blocks from those at 1 and 2 blocks: c(L) = c(1) + (L - 1)(c(2) - c(1))."""
    return StepCosts(
        *(a + (depth - 1) * (b - a) for a, b in zip(astuple(one_block), astuple(two_blocks), strict=True))
    )
