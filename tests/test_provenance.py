"""Provenance: the record in every run folder (provenance.json, at start and on resume, and in each
checkpoint) and in every evaluate.py report (--json and the printed header) is there and true."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import timm
import torch
from conftest import run
from reid_helpers import make_msmt

from dual_cross_attention.builders import build_reid_data
from dual_cross_attention.config import from_dict, load_config
from dual_cross_attention.provenance import UNKNOWN, code_version, config_sha256, environment, selection
from dual_cross_attention.trainer import run_provenance

ROOT = Path(__file__).parents[1]


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout


def test_config_hash_changes_with_any_one_value_and_is_stable_otherwise():
    base = load_config(None, ["train.seed=3"])
    digest = config_sha256(base)
    assert digest == config_sha256(load_config(None, ["train.seed=3"])) and len(digest) == 64
    assert digest == config_sha256(from_dict(base.to_dict()))  # the checkpoint's round trip
    for change in ("train.seed=4", "loss.weights.sa=0.5", "eval.tta=flip", "data.img_size=224"):
        assert config_sha256(load_config(None, ["train.seed=3", change])) != digest, change


def test_environment_is_what_this_process_runs():
    env = environment(torch.device("cpu"))
    assert env["git_commit"] == git("rev-parse", "HEAD").strip()
    assert env["git_dirty"] is bool(git("status", "--porcelain").strip())
    assert (env["torch"], env["timm"], env["cuda"]) == (
        torch.__version__,
        timm.__version__,
        torch.version.cuda,
    )
    assert type(env["torch"]) is str  # not a TorchVersion, which a weights_only checkpoint refuses
    assert env["device"].startswith("cpu") and env["world_size"] == 1


def test_outside_git_or_without_git_the_code_version_is_unknown(tmp_path, monkeypatch):
    assert code_version(tmp_path) == {"git_commit": UNKNOWN, "git_dirty": UNKNOWN}
    monkeypatch.setenv("PATH", str(tmp_path))  # no git binary at all: still no exception
    assert code_version() == {"git_commit": UNKNOWN, "git_dirty": UNKNOWN}


def test_a_reid_run_records_the_dataset_version_and_protocol(tmp_path):
    base = make_msmt(tmp_path, "V2")
    cfg = load_config(None, [
        "data.dataset=msmt17", f"data.root={base}", "data.img_size=[16, 8]", "data.mean=[0.5, 0.5, 0.5]",
        "data.std=[0.5, 0.5, 0.5]", "train.batch_size=4", "reid.identities_per_batch=2",
        "reid.images_per_identity=2", "reid.rerank=true",
    ])  # fmt: skip
    parts = SimpleNamespace(data=build_reid_data(cfg), device=torch.device("cpu"))
    record = run_provenance(cfg, parts, world_size=1, resumed_from=None)
    assert record["dataset"] == {"name": "msmt17", "version": "MSMT17_V2", "root": str(base)}
    assert record["protocol"].startswith("same-identity-same-camera") and "k-reciprocal" in record["protocol"]
    assert record["selection"]["split"] == "test" and record["selection"]["rule"] == "last"


def evaluate_script():
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_folder_and_evaluate_report_record_provenance(cub_root, tmp_path, capsys):
    result = run(cub_root, tmp_path, "train.epochs=1", "data.val_fraction=0.34", "train.seed=5", name="p")
    record = json.loads((result.run_dir / "provenance.json").read_text())
    assert record["git_commit"] == git("rev-parse", "HEAD").strip() and record["torch"] == torch.__version__
    assert record["seed"] == 5 and record["tta"] == "none" and record["dataset"]["name"] == "cub"
    assert record["config_sha256"] == config_sha256(load_config(result.run_dir / "config.yaml"))
    assert record["selection"]["split"] == "val" and record["selection"]["rule"] == "val"
    assert record["protocol"].endswith("over all images of the val split, each counted once")
    assert record["resumed_from"] is None and record["earlier"] == [] and record["init_from"] is None

    checkpoint = result.run_dir / "checkpoints" / "best.pt"
    out = tmp_path / "eval.json"
    argv = ["--checkpoint", str(checkpoint), "--json", str(out), "--throughput-iters", "0", "--no-progress"]
    assert evaluate_script().main(argv) == 0
    header = capsys.readouterr().out
    report = json.loads(out.read_text())["provenance"]
    assert report["git_commit"] == record["git_commit"] and report["git_dirty"] == record["git_dirty"]
    assert report["config_sha256"] == record["config_sha256"]  # no --set overrides: the run's config
    assert report["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert report["selection"]["split"] == "val" and report["selection"]["selected"] is True
    assert report["protocol"].endswith("of the test split, each counted once") and report["tta"] == "none"
    assert report["training"] == {k: v for k, v in record.items() if k != "earlier"}
    assert f"code {record['git_commit'][:12]}" in header and "seed 5" in header and "TTA none" in header
    assert "checkpoint: epoch 0, chosen on the val split" in header

    again = run(cub_root, tmp_path, "train.epochs=2", "data.val_fraction=0.34", "train.seed=5", name="p",
                resume="auto")  # fmt: skip
    resumed = json.loads((again.run_dir / "provenance.json").read_text())
    assert resumed["resumed_from"] == str(result.run_dir / "checkpoints" / "last.pt")
    assert [r["created"] for r in resumed["earlier"]] == [record["created"]]


def test_the_selection_sentence_names_the_metric_of_the_runs_own_task():
    fgvc_val = selection("val", False, "auto", reid=False)["text"]
    reid_val = selection("val", False, "auto", reid=True)["text"]
    assert "top-1" in fgvc_val and "Re-ID" not in fgvc_val and "mAP" not in fgvc_val
    assert "mAP" in reid_val and "identities" in reid_val and "top-1" not in reid_val
    assert "TEST top-1" in selection("test", True, "auto", reid=False)["text"]
    assert "TEST mAP" in selection("test", True, "auto", reid=True)["text"]
    assert "CMC rank-1 (train.select_metric)" in selection("val", False, "top1", reid=True)["text"]
    assert selection("test", False, "auc", reid=False)["rule"] == "last"  # no split: the last epoch
