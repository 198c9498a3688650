"""LR rules and schedule, parameter groups, the uncertainty-weighted loss."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY, TINY_KWARGS

from dual_cross_attention.losses import DCALLoss
from dual_cross_attention.models import DualViT, DualViTOutput
from dual_cross_attention.optim import lr_at_step, parameter_groups, scaled_lr


def test_sqrt_rule_gives_5e4_at_batch_16():
    assert scaled_lr(5e-4, 16, "sqrt")[0] == pytest.approx(5e-4)
    assert scaled_lr(5e-4, 64, "sqrt")[0] == pytest.approx(1e-3)
    assert "sqrt" in scaled_lr(5e-4, 16, "sqrt")[1]


def test_linear_rule_is_the_papers():
    assert scaled_lr(5e-4, 16, "linear")[0] == pytest.approx(1.5625e-5)
    assert scaled_lr(5e-4, 512, "linear")[0] == pytest.approx(5e-4)
    assert scaled_lr(3e-4, 7, "none")[0] == 3e-4


def test_warmup_then_cosine_to_min_lr():
    peak, floor, warmup, total = 1e-3, 1e-6, 10, 110
    lrs = [lr_at_step(s, total, warmup, peak, floor) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(peak / warmup)  # starts low, not at zero
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup], strict=False))
    assert lrs[warmup - 1] == pytest.approx(peak)
    assert lrs[warmup] == pytest.approx(peak)
    assert lrs[warmup + 50] == pytest.approx(floor + 0.5 * (peak - floor))  # cosine midpoint
    assert lrs[total] == pytest.approx(floor)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :], strict=False))


def test_no_weight_decay_on_norms_biases_tokens_and_loss_weights():
    model = DualViT(**TINY, num_classes=3, backbone_kwargs=dict(TINY_KWARGS))
    loss = DCALLoss(("sa", "glca", "pwca"))
    decay, plain = parameter_groups({"model": model, "loss": loss}, 0.05)
    assert decay["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    named = dict(model.named_parameters())
    assert id(named["backbone.blocks.0.attn.qkv.weight"]) in decayed
    assert id(named["glca_head.weight"]) in decayed
    for name in ("backbone.cls_token", "backbone.pos_embed", "backbone.blocks.0.norm1.weight",
                 "backbone.blocks.0.attn.qkv.bias", "glca_norm.bias"):  # fmt: skip
        assert id(named[name]) not in decayed, name
    assert id(loss.log_vars) not in decayed
    total = sum(p.numel() for p in model.parameters()) + 3
    assert sum(p.numel() for g in (decay, plain) for p in g["params"]) == total


def outputs(sa: float, glca: float, pwca: float) -> DualViTOutput:
    """Logits over 2 classes whose cross-entropy for label 0 is the given value."""

    def logits(ce: float) -> torch.Tensor:
        # CE = log(1 + e^d) for logits (0, d)
        return torch.tensor([[0.0, math.log(math.expm1(ce))]])

    return DualViTOutput(
        sa_logits=logits(sa),
        sa_features=torch.zeros(1, 1),
        glca_logits=logits(glca),
        pwca_logits=logits(pwca),
    )


def test_uncertainty_loss_by_hand():
    loss = DCALLoss(("sa", "glca", "pwca"), init_std=0.0)
    with torch.no_grad():
        loss.log_vars.copy_(torch.tensor([0.5, -0.2, 0.0]))
    result = loss(outputs(1.0, 2.0, 3.0), torch.tensor([0]))
    expected = sum(0.5 * (math.exp(-w) * l + w) for w, l in ((0.5, 1.0), (-0.2, 2.0), (0.0, 3.0)))
    assert result.total.item() == pytest.approx(expected, rel=1e-5)
    assert result.per_branch["glca"].item() == pytest.approx(2.0, rel=1e-5)


def test_uncertainty_weights_move_apart_when_losses_differ():
    """d/dw 0.5 (e^-w L + w) = 0.5 (1 - e^-w L): a large loss pushes w up, a small one down."""
    loss = DCALLoss(("sa", "glca", "pwca"), init_std=0.0, clamp=None)
    optimizer = torch.optim.SGD(loss.parameters(), lr=0.1)
    for _ in range(300):
        optimizer.zero_grad()
        loss(outputs(0.2, 1.0, 3.0), torch.tensor([0])).total.backward()
        optimizer.step()
        loss.project()
    w = loss.raw_weights()
    assert w["sa"] < -0.5 and w["pwca"] > 0.5 and abs(w["glca"]) < 0.1  # optimum w = log L
    assert w["pwca"] == pytest.approx(math.log(3.0), abs=0.05)


def test_clamp_is_a_projection_that_keeps_the_gradient():
    loss = DCALLoss(("sa", "pwca"), init_std=0.0, clamp=1.0)
    optimizer = torch.optim.SGD(loss.parameters(), lr=1.0)
    for _ in range(20):
        optimizer.zero_grad()
        result = loss(outputs(20.0, 1.0, 0.01), torch.tensor([0]))
        result.total.backward()
        optimizer.step()
        loss.project()
    assert loss.raw_weights()["sa"] == pytest.approx(1.0)
    assert loss.raw_weights()["pwca"] == pytest.approx(-1.0)
    assert loss.log_vars.grad.abs().min() > 0  # still a live gradient at the bound


def test_random_init_and_fixed_weighting():
    torch.manual_seed(0)
    w = DCALLoss(("sa", "glca", "pwca"), init_std=0.1).raw_weights()
    assert len(set(w.values())) == 3 and max(abs(v) for v in w.values()) < 0.5
    fixed = DCALLoss(("sa", "glca"), weighting="fixed", fixed_weights={"glca": 0.5})
    result = fixed(outputs(1.0, 2.0, 9.0), torch.tensor([0]))
    assert result.total.item() == pytest.approx(1.0 + 0.5 * 2.0, rel=1e-5)
    assert list(fixed.parameters()) == []


def test_missing_branch_output_is_an_error():
    loss = DCALLoss(("sa", "glca", "pwca"))
    out = outputs(1.0, 1.0, 1.0)
    out.pwca_logits = None
    with pytest.raises(ValueError, match="no logits for \\['pwca'\\]"):
        loss(out, torch.tensor([0]))
