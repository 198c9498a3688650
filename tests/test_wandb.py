"""run.wandb: each metrics.csv row and curves.png go to a W&B run, which --resume continues.

W&B runs offline here (no account, no network); the offline run's transaction log
(``run-<id>.wandb``: LevelDB log framing around wandb's protobuf records) is read back directly.
"""

from __future__ import annotations

import json
import math
import struct
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import run

from dual_cross_attention.errors import SetupError


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Offline W&B with every file it writes under tmp_path."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, sub in [("WANDB_DIR", "wandb"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_DATA_DIR", "data")]:  # fmt: skip
        monkeypatch.setenv(var, str(tmp_path / sub))
    wandb.teardown()  # wandb reads the environment once per process: make it read this one
    yield wandb
    wandb.teardown()


def _records(path: Path):
    """The protobuf records of a .wandb file: 32 KiB blocks of chunks, each with a 7-byte header
    (crc32, length, type: 1 full, 2 first, 3 middle, 4 last), after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    data, pos, parts = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def _offline_run(folder: Path) -> tuple[str, str, list[dict[str, str]]]:
    """(run id, display name, history rows as {key: JSON text}) of an offline run folder."""
    (log,) = folder.glob("run-*.wandb")
    # run.finish() can return before wandb's service has flushed the log; its last record is "exit"
    deadline = time.monotonic() + 10
    while not any(r.WhichOneof("record_type") == "exit" for r in _records(log)):
        assert time.monotonic() < deadline, f"{log} never got its exit record"
        time.sleep(0.05)
    run_id, name, history = "", "", []
    for record in _records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id, name = record.run.run_id, record.run.display_name
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): i.value_json for i in record.history.item})
    return run_id, name, history


def test_wandb_logs_every_row_and_the_curves_and_resume_continues_the_run(cub_root, tmp_path, offline):
    no_pwca = "model.pwca=false"  # its columns are NaN in metrics.csv, and not logged
    run(cub_root, tmp_path, "run.wandb=true", no_pwca, "run.stop_after_epochs=1", name="wb")
    result = run(cub_root, tmp_path, "run.wandb=true", no_pwca, name="wb", resume="auto")

    run_id = (result.run_dir / "wandb_id.txt").read_text().strip()
    folders = sorted((result.run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2  # one per invocation, both the same W&B run
    runs = [_offline_run(f) for f in folders]
    assert [(i, n) for i, n, _ in runs] == [(run_id, "wb"), (run_id, "wb")]
    history = [row for _, _, rows in runs for row in rows]
    assert [int(row["_step"]) for row in history] == [0, 1]  # step = epoch

    csv = pd.read_csv(result.run_dir / "metrics.csv")
    assert len(csv) == 2 and csv["weight_pwca"].isna().all()
    for logged, (_, expected) in zip(history, csv.iterrows(), strict=True):
        scalars = {k: v for k, v in expected.items() if k != "epoch" and not math.isnan(v)}
        assert {k for k in logged if not k.startswith(("_", "curves/"))} == set(scalars)
        for key, value in scalars.items():
            assert float(logged[key]) == pytest.approx(value, rel=1e-6), key
    for folder, (_, _, rows) in zip(folders, runs, strict=True):
        (row,) = rows
        assert row["curves/_type"] == '"image-file"'
        image = folder / "files" / json.loads(row["curves/path"])
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wandb_without_the_package_names_the_pip_command(cub_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(SetupError, match="pip install wandb"):
        run(cub_root, tmp_path, "run.wandb=true")


def test_wandb_without_a_login_is_a_setup_error(cub_root, tmp_path, offline, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY"):  # online (wandb's default), and no key
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # (where a wandb login would be)
    offline.teardown()  # (re-read the environment)
    with pytest.raises(SetupError, match="wandb login"):
        run(cub_root, tmp_path, "run.wandb=true")
