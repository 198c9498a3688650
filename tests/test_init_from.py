"""``model.init_from``: a new run starts from a DCAL checkpoint's weights; the heads are dropped (and
reported, exactly) when the class count differs, kept when it is the same; any other misfit is a
clear error; it is not a resume, and it does not mix with one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run, tiny_overrides
from test_reid_train import reid_overrides

from dual_cross_attention.builders import build_model
from dual_cross_attention.checkpoint import CheckpointError, load_checkpoint
from dual_cross_attention.config import load_config
from dual_cross_attention.data.synthetic import DemoSpec, generate_demo_dataset
from dual_cross_attention.errors import UsageError
from dual_cross_attention.finetune import ArchitectureMismatchError, init_from_checkpoint
from dual_cross_attention.provenance import file_sha256
from dual_cross_attention.resume import check_init_from

FGVC_HEADS = ["backbone.head.bias", "backbone.head.weight", "glca_head.bias", "glca_head.weight"]


@pytest.fixture(scope="module")
def source(cub_root, tmp_path_factory) -> Path:
    """last.pt of a one-epoch run on the 3-class set."""
    result = run(cub_root, tmp_path_factory.mktemp("source"), "train.epochs=1", name="source")
    return result.run_dir / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def four_classes(tmp_path_factory) -> Path:
    spec = DemoSpec(seed=2, image_size=32, train_per_class=2, test_per_class=1, num_classes=4)
    return generate_demo_dataset(tmp_path_factory.mktemp("data4") / "cub", spec)


def model_for(root: Path, tmp_path: Path, classes: int, *extra: str):
    cfg = load_config(None, tiny_overrides(root, tmp_path) + list(extra))
    return build_model(cfg, classes), cfg


def test_other_class_count_loads_all_but_the_heads_and_reports_exactly_them(source, four_classes, tmp_path):
    model, cfg = model_for(four_classes, tmp_path, 4)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = init_from_checkpoint(model, source, ["a", "b", "c", "d"], cfg.to_dict())
    assert report.dropped == FGVC_HEADS and report.missing == FGVC_HEADS and report.unexpected == []
    saved = load_checkpoint(source)["model"]
    assert report.loaded == len(saved) - 4 and report.classes == (3, 4)
    for key, value in model.state_dict().items():
        if key in FGVC_HEADS:  # left at the new model's initialisation, with 4 rows
            assert torch.equal(value, fresh[key]) and value.shape[0] == 4
        else:
            assert torch.equal(value, saved[key]), key
    assert "heads dropped (3 classes in the checkpoint, 4 here)" in report.summary()
    assert str(FGVC_HEADS) in report.summary()


def test_same_class_count_loads_everything_heads_too(source, cub_root, tmp_path):
    model, cfg = model_for(cub_root, tmp_path, 3)
    report = init_from_checkpoint(model, source, ["0", "1", "2"], cfg.to_dict())
    assert report.dropped == [] and report.missing == [] and report.unexpected == []
    saved = load_checkpoint(source)["model"]
    assert report.loaded == len(saved)
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_another_architecture_is_a_clear_error(source, cub_root, tmp_path):
    deeper, cfg = model_for(
        cub_root, tmp_path, 3, "model.backbone_kwargs={patch_size: 8, embed_dim: 48, depth: 3, num_heads: 3}"
    )
    with pytest.raises(
        ArchitectureMismatchError, match=r"missing from the checkpoint: backbone\.blocks\.2\."
    ) as e:
        init_from_checkpoint(deeper, source, ["0", "1", "2"], cfg.to_dict())
    assert "model.backbone_kwargs: checkpoint" in str(e.value)
    wider, cfg = model_for(cub_root, tmp_path, 5, "data.img_size=24", "data.resize_size=24")
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(
        ArchitectureMismatchError, match=r"backbone\.pos_embed \(1, 17, 48\) vs \(1, 10, 48\)"
    ):
        init_from_checkpoint(wider, source, list("abcde"), cfg.to_dict())
    assert all(torch.equal(v, before[k]) for k, v in wider.state_dict().items())  # nothing half-loaded


def test_a_missing_init_from_file_is_a_clear_error(cub_root, tmp_path):
    with pytest.raises(CheckpointError, match=r"model.init_from: no checkpoint at .*nowhere\.pt"):
        run(cub_root, tmp_path, f"model.init_from={tmp_path / 'nowhere.pt'}", name="missing")


def test_reid_drops_the_bnneck_classifiers_and_keeps_their_norms(tmp_path):
    cfg = load_config(None, reid_overrides(tmp_path, tmp_path))
    trained = build_model(cfg, 8)
    for head in (trained.backbone.head, trained.glca_head):
        head.neck.running_mean.normal_()
    path = tmp_path / "reid.pt"
    torch.save({"model": trained.state_dict(), "classes": [str(i) for i in range(8)],
                "config": cfg.to_dict()}, path)  # fmt: skip
    model = build_model(cfg, 5)
    report = init_from_checkpoint(model, path, list("abcde"), cfg.to_dict())
    assert (
        report.missing == report.dropped == ["backbone.head.classifier.weight", "glca_head.classifier.weight"]
    )
    torch.testing.assert_close(model.glca_head.neck.running_mean, trained.glca_head.neck.running_mean)


def test_a_run_with_init_from_starts_afresh_from_those_weights(source, four_classes, tmp_path):
    result = run(four_classes, tmp_path, "train.epochs=1", f"model.init_from={source}", name="ft")
    log = (result.run_dir / "train.log").read_text()
    assert f"model.init_from {source}" in log and f"missing keys (freshly initialised): {FGVC_HEADS}" in log
    state = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")
    assert state["epoch"] == 0 and state["global_step"] == 1  # this run's one step: no epoch carried over
    record = json.loads((result.run_dir / "provenance.json").read_text())
    assert record["init_from"] == {"path": str(source), "sha256": file_sha256(source)}
    # resuming the fine-tuning run itself (same init_from) is fine; init_from on another run's resume is not
    check_init_from(load_config(None, [f"model.init_from={source}"]), state["config"], Path("last.pt"))
    with pytest.raises(UsageError, match=r"both --resume \(.*last\.pt\) and model\.init_from \(.*\) apply"):
        run(four_classes, tmp_path, f"model.init_from={source}", name="other", resume=str(source))
