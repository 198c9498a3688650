"""The per-epoch warnings the trainer logs: each stays quiet on a healthy history and speaks on
the failure it names."""

from __future__ import annotations

import math

from dual_cross_attention.diagnostics.health import (
    glca_near_chance,
    health_warnings,
    memory_near_limit,
    train_accuracy_falling,
    weights_not_moving,
)

START = {"sa": 0.1, "glca": -0.05, "pwca": 0.0}


def row(epoch: int, glca: float = 60.0, sa: float = 50.0, moved: float = 0.1) -> dict:
    weights = {f"weight_{b}": w + moved for b, w in START.items()}
    return {"epoch": epoch, "eval_top1_glca": glca, "train_acc_sa": sa, **weights}


def test_a_healthy_run_has_no_warnings():
    history = [row(e, glca=20.0 + 10 * e, sa=30.0 + 10 * e) for e in range(5)]
    assert health_warnings(history, num_classes=200, warmup_epochs=1.0, initial_weights=START) == []


def test_glca_near_chance_after_warmup_only():
    # 200 classes: chance 0.5 %, "near" is below twice chance (1 %); 10 classes: below 2 x 10 = 20 %
    assert glca_near_chance([row(0, glca=0.6)], 200, warmup_epochs=2.0) is None  # still warming up
    assert "near chance (0.5%)" in glca_near_chance([row(2, glca=0.6)], 200, warmup_epochs=2.0)
    assert glca_near_chance([row(2, glca=1.0)], 200, warmup_epochs=2.0) is None
    assert glca_near_chance([row(2, glca=19.0)], 10, warmup_epochs=2.0) is not None
    assert glca_near_chance([row(2, glca=math.nan)], 10, warmup_epochs=2.0) is None  # GLCA off


def test_weights_not_moving():
    assert weights_not_moving([row(0, moved=1e-4)], START) is None  # one epoch is too early
    assert "have not moved" in weights_not_moving([row(0, moved=1e-4), row(1, moved=1e-4)], START)
    assert weights_not_moving([row(0), row(1, moved=2e-3)], START) is None
    assert weights_not_moving([row(0), row(1)], {}) is None  # fixed weighting


def test_train_accuracy_falling_three_epochs_in_a_row():
    falling = [row(e, sa=a) for e, a in enumerate([40.0, 35.0, 30.0, 25.0])]
    assert "fallen 3 epochs in a row (40.0% -> 35.0% -> 30.0% -> 25.0%)" in train_accuracy_falling(falling)
    assert train_accuracy_falling(falling[1:]) is None  # two falls are not three
    recovers = [row(e, sa=a) for e, a in enumerate([40.0, 35.0, 36.0, 25.0])]
    assert train_accuracy_falling(recovers) is None


def test_memory_near_limit_is_judged_on_reserved_memory():
    # 16 GiB card: 9.8 GiB allocated looks safe, but the allocator holds 15.2 GiB of it.
    tight = {"epoch": 3, "peak_mem_mb": 10_000.0, "peak_reserved_mb": 15_600.0}
    roomy = {"epoch": 3, "peak_mem_mb": 10_000.0, "peak_reserved_mb": 12_000.0}
    assert "15600 MiB reserved" in memory_near_limit([tight], device_mb=16_384.0)
    assert memory_near_limit([roomy], device_mb=16_384.0) is None
    assert memory_near_limit([tight], device_mb=None) is None  # the CPU: no device limit
    warnings = health_warnings([tight], 200, 1.0, {}, device_mb=16_384.0)
    assert any("grad_checkpointing" in w for w in warnings)
