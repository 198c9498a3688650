"""The CUDA-only decisions, tested on a CPU by faking the CUDA pieces they read: visible GPUs,
compute capability, a loss scaler that skips steps, peak-memory counters, a precision the device
lacks, a host-device sync, low-precision autocast."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY, TINY_KWARGS, LinearClassifier, run

from dual_cross_attention.checkpoint import load_checkpoint, restore_rng_states, rng_states, save_checkpoint
from dual_cross_attention.engine import StepSettings, TrainingDiverged, train_one_epoch
from dual_cross_attention.losses import DCALLoss, ModelWithLoss
from dual_cross_attention.models import DualViT, random_derangement
from dual_cross_attention.models.rollout import attention_map, rollout_cls_row, rollout_from_qk
from dual_cross_attention.optim import Schedule
from dual_cross_attention.prediction import load_trained
from dual_cross_attention.resume import restore
from dual_cross_attention.runtime import inference_precision, peak_memory_mb, resolve_precision

CUDA = torch.device("cuda")


@pytest.fixture
def one_visible_gpu(monkeypatch):
    """torch believes in one GPU; setting a generator's state records (index) and, as torch's own
    lookup does, fails for a GPU that does not exist."""
    restored: list[int] = []

    def set_rng_state(state: torch.Tensor, device: int = 0) -> None:
        if device >= 1:
            raise IndexError(f"no CUDA generator {device}")
        restored.append(device)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)  # what set_rng_state_all calls
    return restored


def test_rng_states_of_eight_gpus_resume_on_one(one_visible_gpu):
    states = {**_cpu_rng_states(), "cuda": [torch.zeros(16, dtype=torch.uint8)] * 8}
    restore_rng_states(states)
    assert one_visible_gpu == [0]


def _cpu_rng_states() -> dict:
    states = rng_states()
    states.pop("cuda", None)
    return states


@pytest.fixture
def gpu_with_capability(monkeypatch):
    def set_capability(major: int, minor: int) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)

    return set_capability


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((7, 5), torch.float16), ((7, 0), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
)
def test_auto_precision_is_bf16_only_where_native(gpu_with_capability, capability, expected, caplog):
    gpu_with_capability(*capability)
    with caplog.at_level(logging.INFO, logger="dual_cross_attention"):
        assert resolve_precision("auto", CUDA) == expected
    assert f"compute capability {capability[0]}.{capability[1]}" in caplog.text  # the log says why


def test_explicit_bf16_below_ampere_is_refused_with_the_way_out(gpu_with_capability):
    gpu_with_capability(7, 5)
    with pytest.raises(RuntimeError, match="fp16"):
        resolve_precision("bf16", CUDA)
    assert resolve_precision("auto", torch.device("cpu")) == torch.float32


def test_inference_falls_back_to_fp32_where_the_stored_precision_cannot_run(caplog):
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="dual_cross_attention"):
        assert inference_precision("fp16", cpu) == torch.float32
    assert "inference uses fp32" in caplog.text
    assert inference_precision("bf16", cpu) == torch.bfloat16  # CPU autocast runs bf16


def test_fp16_checkpoint_is_usable_on_the_cpu(cub_root, tmp_path):
    result = run(cub_root, tmp_path, "train.epochs=1")
    path = result.run_dir / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    state["config"]["train"]["precision"] = "fp16"  # as written by a GPU run
    fp16_path = save_checkpoint(state, tmp_path / "fp16.pt")
    trained = load_trained(fp16_path)
    assert trained.amp_dtype == torch.float32 and trained.device.type == "cpu"


def test_precision_may_change_on_resume(cub_root, tmp_path):
    run(cub_root, tmp_path, "train.epochs=1")
    resumed = run(cub_root, tmp_path, "train.epochs=2", "train.precision=bf16", resume="auto")
    assert [row["epoch"] for row in resumed.history] == [0, 1]


def test_loss_scaling_starts_afresh_when_resuming_a_run_trained_without_it(cub_root, tmp_path):
    run(cub_root, tmp_path, "train.epochs=1")
    path = tmp_path / "t" / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    assert state["scaler"] == {}  # fp32: a disabled scaler saves nothing
    model = LinearClassifier(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {**state, "optimizer": optimizer.state_dict()}
    scaler = torch.amp.GradScaler("cpu", enabled=True)  # an fp16 run on a GPU
    parts = SimpleNamespace(optimizer=optimizer, scaler=scaler, schedule=Schedule(1e-3, 1e-6, 0, 10))
    cfg = SimpleNamespace(train=SimpleNamespace(epochs=1))
    progress = restore(state, path, parts, cfg)
    assert progress.next_epoch == 1 and scaler.get_scale() == 65536.0


class SkippingScaler:
    """A loss scaler whose every step finds overflowing gradients: it skips the step and halves
    the scale, as torch's GradScaler does for inf/NaN gradients under fp16."""

    def __init__(self) -> None:
        self.scale_value = 1024.0
        self.steps_taken = 0

    def is_enabled(self) -> bool:
        return True

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        pass  # skipped: gradients overflowed

    def update(self) -> None:
        self.scale_value /= 2

    def get_scale(self) -> float:
        return self.scale_value


def _epoch(scaler, max_bad_steps: int, batches: int = 5):
    torch.manual_seed(0)
    data = [(torch.randn(2, 3), torch.randint(0, 2, (2,))) for _ in range(batches)]
    model = LinearClassifier(3, 2)
    module = ModelWithLoss(model, DCALLoss(("sa",), weighting="fixed"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    settings = StepSettings(1, None, max_bad_steps, 0, 1, torch.float32, show_progress=False)
    return train_one_epoch(
        module, data, optimizer, scaler, torch.device("cpu"), lambda step: 0.1, 0, settings
    )


def test_steps_the_loss_scaler_skips_are_counted():
    stats = _epoch(SkippingScaler(), max_bad_steps=10)
    assert stats.skipped_steps == 5 and stats.bad_streak == 5


def test_steps_the_loss_scaler_skips_stop_a_diverged_run():
    with pytest.raises(TrainingDiverged, match="fp16 overflow"):
        _epoch(SkippingScaler(), max_bad_steps=3)


def test_a_healthy_scaler_skips_nothing():
    stats = _epoch(torch.amp.GradScaler("cpu", enabled=False), max_bad_steps=1)
    assert stats.skipped_steps == 0


def test_peak_memory_reports_allocated_and_reserved(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 3 * 2**30)
    assert peak_memory_mb(CUDA) == (1024.0, 3072.0)


def test_cpu_peak_memory_is_the_process_peak():
    allocated, reserved = peak_memory_mb(torch.device("cpu"))
    assert allocated == reserved > 0


def forbid_host_sync(monkeypatch) -> None:
    """From now on, reading a tensor's value on the host (what blocks on a CUDA stream) raises."""

    def forbidden(*args, **kwargs):
        raise AssertionError("host-device sync")

    for name in ("__bool__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)


def test_pairs_are_drawn_without_a_host_sync(monkeypatch):
    model = DualViT(**TINY, backbone_kwargs=TINY_KWARGS, num_classes=3).train()
    images = torch.randn(4, 3, 32, 32)
    forbid_host_sync(monkeypatch)
    for n in (2, 3, 8):
        assert random_derangement(n).shape == (n,)
    model(images)  # the training forward draws its pairs itself


def test_derangement_falls_back_to_a_rotation_when_every_try_has_a_fixed_point():
    torch.manual_seed(0)
    for _ in range(20):
        perm = random_derangement(5, tries=1)  # a single try fails about 37% of the time
        assert sorted(perm.tolist()) == list(range(5)) and all(p != i for i, p in enumerate(perm.tolist()))


def test_rollout_is_float32_under_autocast():
    torch.manual_seed(0)
    qk = [(torch.randn(2, 3, 65, 16), torch.randn(2, 3, 65, 16)) for _ in range(4)]
    reference = rollout_from_qk(qk)
    maps = [attention_map(q, k) for q, k in qk]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = rollout_from_qk(qk)
        explicit = rollout_cls_row(maps[0][:, 0], maps[1:])
    assert fused.dtype == explicit.dtype == torch.float32
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(explicit, reference, rtol=1e-5, atol=1e-7)
