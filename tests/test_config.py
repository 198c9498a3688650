"""Config: YAML loading, typed overrides, strict errors that list the valid keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from dual_cross_attention.config import ConfigError, from_dict, load_config, parse_override

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_overrides_are_typed():
    cfg = load_config(
        None,
        [
            "train.batch_size=4",
            "train.base_lr=5e-4",  # YAML 1.1 reads this as a string; a float field takes it
            "model.pwca=false",
            "model.pretrained_path=null",
            "model.backbone_kwargs={patch_size: 8, depth: 6}",
            "model.backbone_kwargs.embed_dim=96",
            "loss.clamp=null",
        ],
    )
    assert cfg.train.batch_size == 4 and isinstance(cfg.train.batch_size, int)
    assert cfg.train.base_lr == 5e-4 and isinstance(cfg.train.base_lr, float)
    assert cfg.model.pwca is False
    assert cfg.model.backbone_kwargs == {"patch_size": 8, "depth": 6, "embed_dim": 96}
    assert cfg.loss.clamp is None


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=x=y") == ("a.b", "x=y")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("train.batch_size")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.batch_sise=4", r"unknown key 'batch_sise' in section 'train'; valid keys: \[.*'batch_size'"),
        (
            "trian.epochs=3",
            r"unknown section 'trian'.*valid sections: \['data', 'model', 'train', 'loss', 'run', 'lr_find'",
        ),
        ("train.batch_size=2.5", r"train.batch_size: expected int, got 2.5"),
        ("train.batch_size=true", r"train.batch_size: expected int, got True"),
        ("model.glca=1", r"model.glca: expected bool, got 1"),
        ("train.base_lr=fast", r"train.base_lr: expected float, got 'fast'"),
        ("train.lr_scaling=cubic", r"train.lr_scaling must be one of \['sqrt', 'linear', 'none'\]"),
        ("train.precision=fp8", r"train.precision must be one of"),
        ("train.epochs=0", r"train.epochs must be > 0"),
        ("data.img_size=600", r"data.resize_size \(550\) must be >= data.img_size \(600\)"),
        ("train.batch_size=1", r"train.batch_size must be >= 2"),
        ("loss.weights={sa: 1, global: 2}", r"loss.weights has unknown branches \['global'\]"),
        ("train.epochs.max=3", r"too deep"),
    ],
)
def test_bad_overrides_say_what_is_valid(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_yaml_file_errors_name_the_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  epochs: 3\n  warmup: 1\n")
    with pytest.raises(ConfigError, match=rf"{path}: unknown key 'warmup' in section 'train'"):
        load_config(path)
    path.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_overrides_apply_after_the_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  epochs: 3\n  batch_size: 8\n")
    cfg = load_config(path, ["train.epochs=5"])
    assert (cfg.train.epochs, cfg.train.batch_size) == (5, 8)


def test_round_trip_through_dict():
    cfg = load_config(None, ["train.epochs=7", "model.backbone_kwargs={depth: 2}"])
    assert from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.train.batch_size >= 2


def test_shipped_configs_follow_the_fixes():
    names = {p.name for p in CONFIGS}
    for dataset in ("cub", "cars", "aircraft"):
        assert {f"{dataset}_vit_base.yaml", f"{dataset}_deit_tiny.yaml"} <= names
    assert {"demo.yaml", "cub_deit_small.yaml", "cub_deit_base.yaml", "cub_r50_vit_base.yaml"} <= names
    for path in CONFIGS:
        cfg = load_config(path)
        if cfg.task == "reid":  # the paper's Re-ID recipe; tests/test_reid_train.py checks those
            assert not cfg.train.select_on_test, path.name  # no validation split: best.pt = last epoch
            continue
        assert cfg.data.val_fraction > 0, path.name  # best.pt is never chosen on test
        if path.name.startswith("demo"):  # the demos train from scratch on a CPU: their own recipe
            continue
        t = load_config(path).train
        assert (t.batch_size, t.gradient_accumulation_steps, t.warmup_epochs) == (2, 8, 5.0), path.name
        assert (t.lr_scaling, t.base_lr) == ("sqrt", 5e-4), path.name
