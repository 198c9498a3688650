"""ablate.py end to end on a fabricated set: one run per variant x seed, the csv / md / png it
writes, skipping finished runs, continuing interrupted ones, and its refusals."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from conftest import tiny_overrides
from PIL import Image

import dual_cross_attention.ablation.runner as runner
from dual_cross_attention.ablation import BUILTIN_VARIANTS
from dual_cross_attention.config import load_config
from dual_cross_attention.diagnostics.cost import measure_costs
from dual_cross_attention.models import DualViT

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = [
    "variant", "seed", "eval_split", "epochs_done", "epochs",
    "final_eval_top1_sa", "final_eval_top1_glca", "final_eval_top1_sa_glca",
    "best_eval_top1_sa", "best_eval_top1_glca", "best_eval_top1_sa_glca",
    "best_epoch", "train_seconds", "params", "train_flops_vs_sa", "run_dir",
]  # fmt: skip
MODES = {"sa": "final_eval_top1_sa", "glca": "final_eval_top1_glca", "sa+glca": "final_eval_top1_sa_glca"}


def _load_ablate():
    spec = importlib.util.spec_from_file_location("ablate", ROOT / "ablate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ABLATE = _load_ablate()


def ablate(cub_root: Path, out: Path, *args: str, overrides: tuple[str, ...] = ("train.epochs=1",)) -> int:
    """ablate.py in-process with the tiny model of conftest on ``cub_root``, runs under ``out``;
    the config file is ``out/tiny.yaml`` (so the ablation is ``out/tiny`` unless --name)."""
    config = out / "tiny.yaml"
    if not config.exists():
        config.write_text("ablation:\n  variants:\n    mine: {model.glca: false, model.pwca: true}\n")
    base = [o for o in tiny_overrides(cub_root, out) if not o.startswith("run.name=")]
    argv = ["--config", str(config), "--no-progress", *args, "--set", *base, *overrides]
    return ABLATE.main(argv)


@pytest.fixture(scope="module")
def ablation(cub_root, tmp_path_factory) -> Path:
    """sa and dcal, seeds 0 and 1, one epoch each."""
    out = tmp_path_factory.mktemp("ablation")
    assert ablate(cub_root, out, "--variants", "sa", "dcal", "--seeds", "0", "1") == 0
    return out / "tiny"


def _files(root: Path) -> dict[Path, tuple[bytes, int]]:
    paths = [*root.glob("*/metrics.csv"), *root.glob("*/checkpoints/*.pt")]
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}


def test_csv_has_one_row_per_run_with_that_runs_numbers(ablation):
    runs = pd.read_csv(ablation / "ablation.csv")
    assert list(runs.columns) == COLUMNS
    assert list(zip(runs["variant"], runs["seed"], strict=True)) == [
        ("sa", 0),
        ("sa", 1),
        ("dcal", 0),
        ("dcal", 1),
    ]
    for row in runs.itertuples():
        run_dir = ablation / f"{row.variant}_s{row.seed}"
        assert Path(row.run_dir) == run_dir
        metrics = pd.read_csv(run_dir / "metrics.csv")
        last = metrics.iloc[-1]
        assert row.final_eval_top1_sa == pytest.approx(last["eval_top1_sa"])
        assert row.best_eval_top1_sa == pytest.approx(metrics["eval_top1_sa"].max())
        assert row.train_seconds == pytest.approx(metrics["epoch_time_s"].sum())
        assert load_config(run_dir / "config.yaml").train.seed == row.seed
    assert (
        set(runs["eval_split"]) == {"test"}
        and set(runs["epochs_done"]) == {1}
        and set(runs["best_epoch"]) == {0}
    )
    sa, dcal = runs[runs["variant"] == "sa"], runs[runs["variant"] == "dcal"]
    assert sa["final_eval_top1_glca"].isna().all() and dcal["final_eval_top1_glca"].notna().all()
    # `sa` is the plain timm ViT: its parameter count, and DCAL's FLOP ratio as the cost counter has it
    kwargs = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}
    vit = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, **kwargs)
    assert set(sa["params"]) == {sum(p.numel() for p in vit.parameters())}
    assert set(sa["train_flops_vs_sa"]) == {1.0}
    model = DualViT(
        "deit_tiny_patch16_224", num_classes=3, img_size=32, pretrained=False, backbone_kwargs=kwargs
    )
    ratio = measure_costs(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 1])).ratios()["train_flops"]
    assert dcal["train_flops_vs_sa"].iloc[0] == pytest.approx(ratio)
    assert set(dcal["params"]) == {sum(p.numel() for p in model.parameters())}


def _cell_numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"[-+]?\d+\.\d+", cell)]


def test_md_table_is_mean_and_std_over_seeds_of_the_csv(ablation):
    runs = pd.read_csv(ablation / "ablation.csv")
    lines = [line for line in (ablation / "ablation.md").read_text().splitlines() if line.startswith("| `")]
    table = {
        line.split("|")[1].strip().strip("`"): [c.strip() for c in line.split("|")[2:-1]] for line in lines
    }
    assert list(table) == ["sa", "dcal"]
    baseline = runs[runs["variant"] == "sa"].set_index("seed")["final_eval_top1_sa"]
    for variant, group in runs.groupby("variant"):
        cells = table[variant]
        assert cells[0] == "2"
        for index, column in enumerate(MODES.values(), start=1):
            if group[column].isna().all():
                assert cells[index] == "–"
                continue
            mean, std = _cell_numbers(cells[index])
            assert mean == pytest.approx(group[column].mean(), abs=0.006)
            assert std == pytest.approx(group[column].std(), abs=0.006)
        for index, column in ((4, "final_eval_top1_sa"), (5, "final_eval_top1_sa_glca")):
            difference = group.set_index("seed")[column] - baseline
            if difference.isna().all():
                assert cells[index] == "–"
                continue
            mean, std = _cell_numbers(cells[index])
            assert mean == pytest.approx(difference.mean(), abs=0.006)
            assert std == pytest.approx(difference.std(), abs=0.006)


def test_png_is_written(ablation):
    with Image.open(ablation / "ablation.png") as image:
        assert image.size == (900, 550)


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("train() called for a finished run")

    monkeypatch.setattr(runner, "train", refuse)


def test_second_invocation_trains_nothing(ablation, cub_root, no_training):
    before, csv = _files(ablation), (ablation / "ablation.csv").read_text()
    assert ablate(cub_root, ablation.parent, "--variants", "sa", "dcal", "--seeds", "0", "1") == 0
    assert _files(ablation) == before and len(before) >= 8
    assert (ablation / "ablation.csv").read_text() == csv


def test_a_finished_run_made_with_another_config_is_refused(ablation, cub_root, no_training, capsys):
    overrides = ("train.epochs=1", "train.base_lr=2e-3")
    assert ablate(cub_root, ablation.parent, "--variants", "sa", "--seeds", "0", overrides=overrides) == 1
    err = capsys.readouterr().err
    assert "train.base_lr: 0.001 -> 0.002" in err and "another --name" in err


def test_an_interrupted_run_is_continued_by_the_next_invocation(cub_root, tmp_path):
    two = ("train.epochs=2",)
    assert (
        ablate(
            cub_root,
            tmp_path,
            "--variants",
            "sa",
            "--seeds",
            "0",
            overrides=(*two, "run.stop_after_epochs=1"),
        )
        == 0
    )
    run_dir = tmp_path / "tiny" / "sa_s0"
    first = pd.read_csv(run_dir / "metrics.csv")
    assert list(first["epoch"]) == [0]
    assert "sa seed 0 (1 of 2 epochs)" in (tmp_path / "tiny" / "ablation.md").read_text()
    assert ablate(cub_root, tmp_path, "--variants", "sa", "--seeds", "0", overrides=two) == 0
    second = pd.read_csv(run_dir / "metrics.csv")
    assert list(second["epoch"]) == [0, 1]
    pd.testing.assert_frame_equal(second.iloc[:1], first)  # epoch 0 kept, not retrained
    assert "resumed from" in (run_dir / "train.log").read_text()
    runs = pd.read_csv(tmp_path / "tiny" / "ablation.csv")
    assert list(runs["epochs_done"]) == [2]
    assert "| `sa` | 1 |" in (tmp_path / "tiny" / "ablation.md").read_text()


def test_unknown_variant_is_an_error_listing_the_known_ones(cub_root, tmp_path, capsys):
    assert ablate(cub_root, tmp_path, "--variants", "sa", "dcall") == 1
    err = capsys.readouterr().err
    assert "unknown variant(s) ['dcall']" in err
    for name in [*BUILTIN_VARIANTS, "mine"]:  # built in, and the config's ablation.variants
        assert f"'{name}'" in err
    assert not (tmp_path / "tiny").exists()


def test_a_variant_with_an_unknown_key_names_it_and_the_valid_keys(cub_root, tmp_path, capsys):
    bad = "ablation.variants={typo: {model.glka: true}}"
    assert ablate(cub_root, tmp_path, "--variants", "typo", overrides=("train.epochs=1", bad)) == 1
    err = capsys.readouterr().err
    assert "variant 'typo'" in err and "unknown key 'glka'" in err and "'glca'" in err


def test_seed_and_run_name_are_the_ablations_own(cub_root, tmp_path, capsys):
    assert ablate(cub_root, tmp_path, overrides=("train.seed=3",)) == 1
    assert "use --seeds" in capsys.readouterr().err


def test_under_torchrun_rank_0_decides_what_is_left_and_writes_the_table(ablation, cub_root, tmp_path):
    shutil.copytree(ablation / "sa_s0", tmp_path / "tiny" / "sa_s0")  # finished: to be skipped
    finished = _files(tmp_path / "tiny")
    (tmp_path / "tiny.yaml").write_text("{}\n")
    base = [o for o in tiny_overrides(cub_root, tmp_path) if not o.startswith("run.name=")]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29527",
               str(ROOT / "ablate.py"), "--config", str(tmp_path / "tiny.yaml"), "--variants", "sa",
               "--seeds", "0", "1", "--no-progress", "--set", *base, "train.epochs=1"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("| `sa` | 2 |") == 1  # the table, printed by rank 0 only
    assert _files(tmp_path / "tiny") | finished == _files(tmp_path / "tiny")  # sa_s0 untouched
    assert "2 processes" in (tmp_path / "tiny" / "sa_s1" / "train.log").read_text()
    assert list(pd.read_csv(tmp_path / "tiny" / "ablation.csv")["seed"]) == [0, 1]
