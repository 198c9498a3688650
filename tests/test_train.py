"""The training application end to end on a fabricated CUB-layout set: metrics, checkpoints,
exact resume, the NaN guard, refusals."""

from __future__ import annotations

import copy
import logging
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import LinearClassifier, run, tiny_overrides

from dual_cross_attention.builders import build_datasets, normalization
from dual_cross_attention.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dual_cross_attention.config import ConfigError, load_config
from dual_cross_attention.engine import (
    StepSettings,
    TrainingDiverged,
    clipped_parameters,
    optimizer_step,
    train_one_epoch,
)
from dual_cross_attention.errors import UsageError
from dual_cross_attention.losses import DCALLoss, ModelWithLoss
from dual_cross_attention.resume import RunExistsError, keep_effective_batch

ROOT = Path(__file__).parents[1]
TIME_COLUMNS = ["epoch_time_s", "peak_mem_mb", "peak_reserved_mb"]


def test_two_epochs_write_metrics_config_and_checkpoints(cub_root, tmp_path):
    result = run(cub_root, tmp_path)
    frame = pd.read_csv(result.run_dir / "metrics.csv")
    assert list(frame["epoch"]) == [0, 1]
    branches = ("sa", "glca", "pwca")
    columns = ["lr", "train_loss", "eval_top1_sa", "eval_top1_glca", "eval_top1_sa_glca", "epoch_time_s"]
    columns += [f"{kind}_{b}" for kind in ("train_loss", "train_acc", "weight") for b in branches]
    for column in columns + ["peak_mem_mb"]:
        assert frame[column].notna().all(), column
    assert load_config(result.run_dir / "config.yaml").run.name == "t"
    state = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")
    assert state["epoch"] == 1 and state["classes"] == ["001.mark_a", "002.mark_b", "003.mark_c"]
    # 18 images / batch 4 = 4 micro-batches (drop_last) -> 2 optimizer steps per epoch.
    assert state["global_step"] == 4
    assert state["config"]["train"]["epochs"] == 2
    assert (result.run_dir / "checkpoints" / "best.pt").exists()
    assert (result.run_dir / "train.log").read_text().count("effective batch 8 = 4 x 2") == 1
    w0, w1 = state["initial_loss_weights"], frame.iloc[-1]
    assert any(abs(w1[f"weight_{b}"] - w0[b]) > 1e-4 for b in w0)  # the loss weights do move


def test_resume_reproduces_the_uninterrupted_run(cub_root, tmp_path):
    straight = run(cub_root, tmp_path, name="straight")
    run(cub_root, tmp_path, "run.stop_after_epochs=1", name="split")
    resumed = run(cub_root, tmp_path, name="split", resume="auto")
    a = pd.read_csv(straight.run_dir / "metrics.csv").drop(columns=TIME_COLUMNS)
    b = pd.read_csv(resumed.run_dir / "metrics.csv").drop(columns=TIME_COLUMNS)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    wa = load_checkpoint(straight.run_dir / "checkpoints" / "last.pt")["model"]
    wb = load_checkpoint(resumed.run_dir / "checkpoints" / "last.pt")["model"]
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_resume_with_more_epochs_extends_the_schedule(cub_root, tmp_path, caplog):
    run(cub_root, tmp_path)
    with caplog.at_level("INFO"):
        result = run(cub_root, tmp_path, "train.epochs=3", resume="auto")
    assert list(pd.read_csv(result.run_dir / "metrics.csv")["epoch"]) == [0, 1, 2]
    assert "the cosine schedule is rebuilt" in caplog.text


def test_existing_run_and_incompatible_resume_are_refused(cub_root, tmp_path):
    run(cub_root, tmp_path, "train.epochs=1")
    with pytest.raises(RunExistsError, match="--resume auto"):
        run(cub_root, tmp_path, "train.epochs=1")
    with pytest.raises(ValueError, match=r"model.top_ratio: 0.1 -> 0.2"):
        run(cub_root, tmp_path, "model.top_ratio=0.2", resume="auto")


def test_non_finite_loss_stops_with_the_branch_and_keeps_last_good(cub_root, tmp_path, monkeypatch):
    run(cub_root, tmp_path, "run.stop_after_epochs=1")
    last = tmp_path / "t" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    original = DCALLoss.forward

    def glca_goes_nan(self, out, labels):
        out.glca_logits = out.glca_logits * math.nan
        return original(self, out, labels)

    monkeypatch.setattr(DCALLoss, "forward", glca_goes_nan)
    with pytest.raises(TrainingDiverged, match=rf"2 optimizer steps in a row .* glca .*last LR.*{last}"):
        run(cub_root, tmp_path, "train.max_bad_steps=2", resume="auto")
    assert last.read_bytes() == before
    assert load_checkpoint(last)["epoch"] == 0


class Evil:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_checkpoint_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(path)
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "broken.pt")


def test_accumulation_scales_by_the_window_including_a_short_last_one():
    torch.manual_seed(0)
    batches = [(torch.randn(2, 3), torch.randint(0, 2, (2,))) for _ in range(5)]  # windows of 2, 2, 1
    model = LinearClassifier(3, 2)
    reference = copy.deepcopy(model)
    module = ModelWithLoss(model, DCALLoss(("sa",), weighting="fixed"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    settings = StepSettings(2, None, 3, 0, 1, torch.float32, show_progress=False)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    cpu, constant_lr = torch.device("cpu"), lambda step: 0.5
    stats = train_one_epoch(module, batches, optimizer, scaler, cpu, constant_lr, 0, settings)
    assert stats.steps == 3
    for window in (batches[0:2], batches[2:4], batches[4:5]):
        reference.zero_grad()
        loss = sum(F.cross_entropy(reference.fc(x), y) for x, y in window) / len(window)
        loss.backward()
        with torch.no_grad():
            for p in reference.parameters():
                p -= 0.5 * p.grad
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_train_script_reports_config_errors(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--set", "train.batch_sise=4"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert "unknown key 'batch_sise' in section 'train'" in result.stderr


def test_train_script_runs_an_epoch(cub_root, tmp_path):
    overrides = [o for o in tiny_overrides(cub_root, tmp_path) if not o.startswith("train.epochs")]
    overrides += ["train.epochs=1", "train.lr_scaling=sqrt"]
    command = [sys.executable, str(ROOT / "train.py"), "--no-progress", "--set", *overrides]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "run " in result.stdout and "best top-1" in result.stdout
    assert "LR 0.000707" in result.stderr  # sqrt rule at effective batch 8: 1e-3 x sqrt(8/16)


def test_clipping_leaves_the_model_step_alone_when_only_the_loss_weights_are_large():
    torch.manual_seed(0)
    model = LinearClassifier(3, 4)
    with torch.no_grad():
        model.fc.weight.mul_(0.1)
    criterion = DCALLoss(("sa",), init_std=0.0, clamp=None)
    module = ModelWithLoss(model, criterion)
    x, y = torch.randn(2, 3) * 0.1, torch.tensor([0, 1])
    result = module(x, y)
    result.total.backward()
    model_grads = [p.grad.clone() for p in model.parameters()]
    weight_grad = criterion.log_vars.grad.clone()
    model_norm = torch.cat([g.flatten() for g in model_grads]).norm()
    assert model_norm < 0.9 and weight_grad.abs().max() > 0.1  # the model's own norm is under the clip
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD([*model.parameters(), criterion.log_vars], lr=1.0)
    params = clipped_parameters(module)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    window = torch.stack([result.per_branch["sa"].detach()])[None]
    with torch.no_grad():  # scale the loss weight's gradient far past the clip
        criterion.log_vars.grad.mul_(100.0)
    assert optimizer_step(optimizer, scaler, params, 1.0, window, ("sa",)) is None
    for p, b, g in zip(model.parameters(), before, model_grads, strict=True):
        torch.testing.assert_close(p.detach(), b - g)  # unshrunk: lr 1 x the model's own gradient


def test_best_checkpoint_is_chosen_on_val_else_the_last_epoch(cub_root, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="dual_cross_attention"):
        no_val = run(cub_root, tmp_path, "train.epochs=3", name="no_val")
    assert "best.pt: the last epoch" in caplog.text
    assert load_checkpoint(no_val.run_dir / "checkpoints" / "best.pt")["epoch"] == 2  # never picked on test
    assert no_val.best_metric == no_val.history[-1]["eval_top1_sa_glca"]
    on_test = run(cub_root, tmp_path, "train.epochs=3", "train.select_on_test=true", name="on_test")
    best = max(row["eval_top1_sa_glca"] for row in on_test.history)
    assert on_test.best_metric == best
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dual_cross_attention"):
        on_val = run(cub_root, tmp_path, "train.epochs=2", "data.val_fraction=0.34", name="on_val")
    assert "best validation top-1" in caplog.text and on_val.history[-1]["eval_images"] < 9


def test_resume_under_fewer_processes_keeps_the_effective_batch():
    cfg = load_config(None, ["train.batch_size=4", "train.gradient_accumulation_steps=2"])
    state = {"world_size": 2}  # written by 2 processes: effective batch 16
    kept = keep_effective_batch(cfg, state, Path("last.pt"), world_size=1)
    assert kept.train.gradient_accumulation_steps == 4
    assert keep_effective_batch(cfg, {"world_size": 1}, Path("last.pt"), 1) is cfg
    with pytest.raises(UsageError, match="effective batch 16 .* 3 processes does not divide it"):
        keep_effective_batch(cfg, state, Path("last.pt"), world_size=3)


def test_epoch_snapshots_keep_the_newest(cub_root, tmp_path):
    result = run(cub_root, tmp_path, "train.epochs=5", "train.checkpoint_every=2", "train.keep_checkpoints=1")
    snapshots = sorted(p.name for p in (result.run_dir / "checkpoints").glob("epoch_*.pt"))
    assert snapshots == ["epoch_3.pt"]  # epochs 1 and 3 end a pair; only the newest is kept
    assert load_checkpoint(result.run_dir / "checkpoints" / "epoch_3.pt")["epoch"] == 3


def test_flip_and_normalisation_switches(cub_root, tmp_path):
    def train_steps(*extra: str) -> list[str]:
        cfg = load_config(None, tiny_overrides(cub_root, tmp_path) + list(extra))
        return [type(step).__name__ for step in build_datasets(cfg).train.transform.compose.transforms]

    assert "HorizontalFlip" in train_steps() and "HorizontalFlip" not in train_steps("data.hflip=false")
    cfg = load_config(None, ["data.mean=[0.5, 0.5, 0.5]", "data.std=[0.25, 0.25, 0.25]"])
    assert normalization(cfg) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    with pytest.raises(ConfigError, match="together"):
        load_config(None, ["data.mean=[0.5, 0.5, 0.5]"])


def test_a_checkpoint_from_before_a_new_config_key_resumes(cub_root, tmp_path):
    run(cub_root, tmp_path, "train.epochs=1")
    path = tmp_path / "t" / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    del state["config"]["train"]["select_on_test"]  # as written before the key existed
    save_checkpoint(state, path)
    resumed = run(cub_root, tmp_path, "train.epochs=2", resume="auto")
    assert [row["epoch"] for row in resumed.history] == [0, 1]
