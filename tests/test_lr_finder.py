"""The LR range test: its suggestion against brute-force training, restoration, early stop."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
from conftest import LinearClassifier, tiny_overrides

from dual_cross_attention.config import load_config
from dual_cross_attention.losses import DCALLoss, ModelWithLoss
from dual_cross_attention.lr_finder import find_lr, lr_at, lr_range_test

CPU = torch.device("cpu")


def problem() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A linearly separable 4-class problem in 8 dimensions, in batches of 32."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(8, 4, generator=generator)
    x = torch.randn(512, 8, generator=generator)
    y = (x @ weights).argmax(dim=1)
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, 512, 32)]


def fresh(lr: float = 1e-3) -> tuple[ModelWithLoss, torch.optim.Optimizer]:
    torch.manual_seed(1)
    module = ModelWithLoss(LinearClassifier(8, 4), DCALLoss(("sa",), weighting="fixed"))
    return module, torch.optim.AdamW(module.parameters(), lr=lr)


def run_test(module, optimizer, batches, **kwargs):
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return lr_range_test(module, batches, optimizer, scaler, CPU, torch.float32, 1, None, **kwargs)


def final_loss(lr: float, batches) -> float:
    """Loss after three epochs of plain training at ``lr``: the brute-force reference."""
    module, optimizer = fresh(lr)
    for _ in range(3):
        for x, y in batches:
            optimizer.zero_grad()
            module(x, y).total.backward()
            optimizer.step()
    with torch.no_grad():
        return sum(module(x, y).total.item() for x, y in batches) / len(batches)


def test_suggestion_lands_in_the_range_that_trains_best():
    batches = problem()
    grid = [10.0**e for e in range(-4, 3)] + [3 * 10.0**e for e in range(-4, 2)]
    losses = {lr: final_loss(lr, batches) for lr in sorted(grid)}
    best = min(losses.values())
    good = [lr for lr, loss in losses.items() if loss <= 1.5 * best]
    module, optimizer = fresh()
    result = run_test(module, optimizer, batches, start=1e-5, end=1e3, steps=100)
    assert min(good) <= result.steepest_lr <= max(good), (result.steepest_lr, losses)
    assert result.min_over_10_lr < result.steepest_lr * 10


def test_nothing_is_trained_by_it():
    module, optimizer = fresh()
    batches = problem()
    optimizer.zero_grad()
    module(*batches[0]).total.backward()
    optimizer.step()  # an optimizer with state, as after some training
    before = copy.deepcopy((module.state_dict(), optimizer.state_dict()))
    run_test(module, optimizer, batches, start=1e-5, end=10.0, steps=30)
    after = (module.state_dict(), optimizer.state_dict())
    for key, value in before[0].items():
        assert torch.equal(after[0][key], value), key
    assert after[1]["param_groups"][0]["lr"] == before[1]["param_groups"][0]["lr"]
    for index, state in before[1]["state"].items():
        for key, value in state.items():
            assert torch.equal(after[1]["state"][index][key], value), key


def test_early_stop_when_the_loss_explodes():
    module, optimizer = fresh()
    result = run_test(module, optimizer, problem(), start=1e-4, end=1e6, steps=200)
    assert result.stopped_early and len(result.lrs) < 200
    assert "exceeded 4x its minimum" in result.reason or "non-finite" in result.reason
    assert result.smoothed[-1] > 4 * min(result.smoothed) or "non-finite" in result.reason


def test_sweep_is_exponential():
    assert lr_at(0, 5, 1e-6, 1e-2) == pytest.approx(1e-6)
    assert lr_at(2, 5, 1e-6, 1e-2) == pytest.approx(1e-4)
    assert lr_at(4, 5, 1e-6, 1e-2) == pytest.approx(1e-2)


def test_find_lr_on_the_full_model_writes_its_report(cub_root, tmp_path):
    overrides = tiny_overrides(cub_root, tmp_path, name="lrf") + ["lr_find.steps=8", "lr_find.start=1e-5"]
    result, config_lr, rule = find_lr(load_config(None, overrides))
    frame = pd.read_csv(tmp_path / "lrf" / "lr_find.csv")
    assert list(frame.columns) == ["lr", "loss", "smoothed_loss"] and len(frame) == len(result.lrs) <= 8
    assert (tmp_path / "lrf" / "lr_find.png").stat().st_size > 1000
    assert config_lr == pytest.approx(1e-3 * (8 / 16) ** 0.5) and "sqrt" in rule
    assert not (tmp_path / "lrf" / "checkpoints").exists()  # nothing trained, nothing saved
