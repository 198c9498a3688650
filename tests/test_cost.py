"""The cost of a DCAL step against the plain ViT, as deterministic ratios (FLOPs, bytes saved
for backward), read from ``diagnostics.cost.measure_costs``."""

from __future__ import annotations

import gc

import pytest
import torch

from dual_cross_attention.diagnostics.cost import StepCosts, count_flops, measure_costs, saved_bytes
from dual_cross_attention.models import DualViT, dual_vit


@pytest.fixture(scope="module")
def deit_tiny_224() -> tuple[DualViT, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = DualViT("deit_tiny_patch16_224", num_classes=200, img_size=224, pretrained=False)
    return model, torch.randn(2, 3, 224, 224), torch.tensor([3, 7])


@pytest.fixture(scope="module")
def costs(deit_tiny_224) -> StepCosts:
    return measure_costs(*deit_tiny_224)


def test_train_and_inference_cost_ratios(costs):
    """At 224 px attention is a smaller share than at 448, so these sit below the 448 figures
    (printed by benchmarks/bench_model.py); the bounds are the targets. Inference recomputes the
    attention scores for rollout (no N x N maps are kept): 1.08x here."""
    ratios = costs.ratios()
    assert 2.0 < ratios["train_flops"] <= 2.5  # > 2: PWCA repeats every block over 2N keys
    assert 1.5 < ratios["saved_bytes"] <= 2.3
    assert 1.0 < ratios["inference_flops"] <= 1.35


def test_checkpointing_cuts_saved_bytes(costs, deit_tiny_224):
    assert costs.dcal_checkpointed_bytes <= 0.5 * costs.dcal_saved_bytes
    assert deit_tiny_224[0].grad_checkpointing is False  # measure_costs restores the model's setting


def test_glca_overhead_matches_the_paper(deit_tiny_224, monkeypatch):
    """The paper: GLCA adds about 9% parameters and 2% FLOPs to DeiT-Tiny. Counted as the paper
    counts it, with rollout from attention maps the forward computes anyway (our explicit path);
    the fused path's recomputed scores are pinned in test_fused_rollout."""
    monkeypatch.setattr(dual_vit, "lse_available", lambda x, head_dim: False)
    model, images, _ = deit_tiny_224
    without = DualViT("deit_tiny_patch16_224", num_classes=200, img_size=224, pretrained=False, glca=False)
    params = sum(p.numel() for p in model.parameters())
    base_params = sum(p.numel() for p in without.parameters())
    assert 0.07 <= params / base_params - 1 <= 0.11
    model.eval(), without.eval()
    with torch.no_grad():
        flops = count_flops(lambda: model(images[:1]))
        base_flops = count_flops(lambda: without(images[:1]))
    assert 1.0 < flops / base_flops <= 1.03


def test_saved_bytes_counts_unique_storages_and_frees_them():
    """softmax keeps its (4, 8) fp32 output and ``x * x`` keeps x once for both operands: 128 bytes
    each. Outputs saved by their own node once formed a cycle through the autograd graph; the
    count of live tensors must not grow across calls."""
    x = torch.randn(4, 8, requires_grad=True)
    assert saved_bytes(lambda: torch.softmax(x, dim=-1).sum()) == 4 * 8 * 4
    assert saved_bytes(lambda: (x * x).sum()) == 4 * 8 * 4

    def live_tensors() -> int:
        gc.collect()
        return sum(issubclass(type(obj), torch.Tensor) for obj in gc.get_objects())

    saved_bytes(lambda: torch.softmax(x, dim=-1).sum())
    before = live_tensors()
    for _ in range(3):
        saved_bytes(lambda: torch.softmax(x, dim=-1).sum())
    assert live_tensors() == before
