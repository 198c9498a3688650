"""torchrun + DDP on the CPU (gloo): two processes train one epoch on a fabricated set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import run, tiny_overrides

from dual_cross_attention.builders import build_schedule
from dual_cross_attention.checkpoint import load_checkpoint
from dual_cross_attention.config import load_config
from dual_cross_attention.data.synthetic import DemoSpec, generate_demo_dataset
from dual_cross_attention.distributed import ShardSampler
from dual_cross_attention.trainer import train

WORKER = Path(__file__).with_name("ddp_worker.py")
ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def odd_sized_root(tmp_path_factory) -> Path:
    """9 test images: an odd count that DistributedSampler would pad to 10 over two processes."""
    spec = DemoSpec(seed=2, image_size=32, train_per_class=6, test_per_class=3, num_classes=3)
    return generate_demo_dataset(tmp_path_factory.mktemp("ddp") / "cub", spec)


def test_shards_cover_every_index_once():
    shards = [list(ShardSampler(9, rank, 2)) for rank in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(9))
    assert len(shards[0]) == 5 and len(shards[1]) == 4


def test_two_processes_train_evaluate_once_and_resume_alone(odd_sized_root, tmp_path):
    overrides = tiny_overrides(odd_sized_root, tmp_path, name="ddp")
    overrides = [o for o in overrides if not o.startswith("train.epochs")] + ["train.epochs=1"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
               str(WORKER), str(tmp_path), *overrides]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (tmp_path / "ddp" / "train.log").read_text()
    assert "effective batch 16 = 4 x 2 accumulation x 2 processes" in log  # the LR rule sees both
    frame = pd.read_csv(tmp_path / "ddp" / "metrics.csv")
    assert list(frame["eval_images"]) == [9]  # every test image once, none padded
    rank0 = torch.load(tmp_path / "weights_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "weights_rank1.pt", weights_only=True)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    state = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    for key in rank0:
        assert torch.equal(state["model"][key], rank0[key]), key
    assert state["loss"]["log_vars"].abs().sum() > 0
    # Evaluation under torchrun counts each of the 9 test images once and agrees with one process.
    last = tmp_path / "ddp" / "checkpoints" / "last.pt"
    results = []
    for launcher in (["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29518"], []):
        out = tmp_path / f"eval{len(launcher)}.json"
        options = [
            "--json",
            str(out),
            "--throughput-iters",
            "0",
            "--no-progress",
            "--out",
            str(tmp_path / "ev"),
        ]
        command = [sys.executable, *launcher, str(ROOT / "evaluate.py"), "--checkpoint", str(last), *options]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        results.append(json.loads(out.read_text()))
    assert results[0]["num_images"] == results[1]["num_images"] == 9
    assert results[0]["sa+glca"] == results[1]["sa+glca"]
    # The two-process checkpoint continues in a single process.
    resumed = run(odd_sized_root, tmp_path, "train.epochs=2", name="ddp", resume="auto")
    assert [row["epoch"] for row in resumed.history] == [0, 1]
    # ... with the same effective batch, so the LR schedule continues where 2 processes left it.
    log = (tmp_path / "ddp" / "train.log").read_text()
    assert "effective batch 16 = 4 x 4 accumulation;" in log and "keeps the effective batch 16" in log
    two = build_schedule(load_config(None, overrides).train, batches_per_epoch=2, world_size=2)[0]
    assert resumed.history[1]["lr"] == pytest.approx(two(1))  # epoch 1 = optimizer step 1


def test_resume_without_a_shared_run_folder_stops_every_process(odd_sized_root, tmp_path):
    """Rank 0 finds last.pt, rank 1 (another node's disk) does not: no process may go on alone."""
    base = [o for o in tiny_overrides(odd_sized_root, tmp_path, name="split") if not o.startswith("train.")]
    base += ["train.batch_size=4", "train.device=cpu"]
    rank0_runs = tmp_path / "rank0" / "runs"
    (tmp_path / "rank1").mkdir(parents=True)
    train(load_config(None, base + ["train.epochs=1", f"run.output_dir={rank0_runs}"]), show_progress=False)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519",
               str(WORKER), str(tmp_path), *base, "train.epochs=2", "run.output_dir=runs"]  # fmt: skip
    env = {**os.environ, "DCAL_TEST_RANK_DIRS": str(tmp_path), "DCAL_TEST_RESUME": "auto"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode != 0
    assert "cannot read" in done.stderr and "shares" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "weights_rank1.pt").exists()  # rank 1 did not train on from fresh weights
