"""The training application end to end on a fabricated CUB-layout set: metrics, checkpoints,
exact resume, the NaN guard, refusals."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import LinearClassifier, run, tiny_overrides

from dual_cross_attention.checkpoint import CheckpointError, load_checkpoint
from dual_cross_attention.config import load_config
from dual_cross_attention.engine import StepSettings, TrainingDiverged, train_one_epoch
from dual_cross_attention.losses import DCALLoss, ModelWithLoss
from dual_cross_attention.trainer import RunExistsError

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
