"""Deterministic cost figures of a training step: FLOPs and bytes saved for backward.

Both are exact counts, not timings, so tests may assert them as ratios against the plain
timm ViT. FLOPs are counted under the math SDPA backend because ``FlopCounterMode`` cannot
see the CPU flash kernel and would hide the attention cost.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .models.dual_vit import DualViT


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


@dataclass
class CostRatios:
    """DCAL cost over the plain ViT of the same backbone, batch and image size."""

    train_flops: float
    saved_bytes: float
    inference_flops: float
    dcal_train_flops: int
    plain_train_flops: int


def plain_vit_like(model: DualViT) -> nn.Module:
    """The timm ViT that ``model`` drives, alone: the baseline every ratio is taken against."""
    return copy.deepcopy(model.backbone)


def measure_cost_ratios(model: DualViT, images: torch.Tensor, labels: torch.Tensor) -> CostRatios:
    """Train-step FLOPs, saved bytes and inference FLOPs of ``model`` relative to its plain ViT."""
    plain = plain_vit_like(model)
    model.train()
    plain.train()

    def train_step(net: nn.Module, loss_fn: Callable) -> Callable[[], None]:
        return lambda: loss_fn(net, images, labels).backward()

    dcal_flops = count_flops(train_step(model, dcal_loss))
    plain_flops = count_flops(train_step(plain, plain_loss))
    dcal_bytes = saved_bytes(lambda: dcal_loss(model, images, labels))
    plain_bytes = saved_bytes(lambda: plain_loss(plain, images, labels))
    model.eval()
    plain.eval()
    with torch.no_grad():
        dcal_infer = count_flops(lambda: model(images))
        plain_infer = count_flops(lambda: plain(images))
    model.zero_grad(set_to_none=True)
    return CostRatios(
        train_flops=dcal_flops / plain_flops,
        saved_bytes=dcal_bytes / plain_bytes,
        inference_flops=dcal_infer / plain_infer,
        dcal_train_flops=dcal_flops,
        plain_train_flops=plain_flops,
    )
