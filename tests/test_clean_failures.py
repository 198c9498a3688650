"""Foreseeable failures end in one line `error: <message>` and exit code 1, never a traceback;
Ctrl-C and SIGTERM stop cleanly with the command that resumes; SIGKILL leaves a run that resumes
without a missing or doubled epoch; two processes never train into one run folder."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import run, tiny_overrides

from dual_cross_attention.run_io import RunInUseError

ROOT = Path(__file__).parents[1]
DEFAULTS: Path  # set by _defaults_file


def train_command(*overrides: str) -> list[str]:
    """train.py on the config defaults plus ``overrides``, as ``conftest.run`` trains in-process."""
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        str(DEFAULTS),
        "--no-progress",
        "--set",
        *overrides,
    ]


@pytest.fixture(scope="module", autouse=True)
def _defaults_file(tmp_path_factory) -> None:
    global DEFAULTS
    DEFAULTS = tmp_path_factory.mktemp("config") / "defaults.yaml"
    DEFAULTS.write_text("{}\n")  # an empty config: every key at its default


def broken_cub(cub_root: Path, tmp_path: Path, how: str) -> Path:
    if how == "missing":
        return tmp_path / "nonexistent" / "cub"
    if how == "empty":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty"
    if how == "file":
        (tmp_path / "a_file").write_text("not a dataset")
        return tmp_path / "a_file"
    copy = tmp_path / "cub"
    shutil.copytree(cub_root, copy)
    first = sorted((copy / "images").rglob("train_*.jpg"))[0]  # read in the first epoch
    if how == "image_gone":
        first.unlink()
    elif how == "truncated":
        first.write_bytes(first.read_bytes()[:200])
    return copy


def train_script():
    """train.py as a module, to call its ``main`` in-process."""
    return _script("train")


@pytest.mark.parametrize(
    ("case", "extra", "message"),
    [
        ("missing", [], "does not exist"),
        ("empty", [], "CUB"),
        ("file", [], "no images.txt"),
        ("image_gone", [], "do not exist"),
        ("truncated", [], "cannot decode image"),
        ("ok", ["train.batch_size=32", "model.pwca=false"], "fewer than train.batch_size"),
        ("ok", ["run.tensorboard=true"], "pip install tensorboard"),
    ],
)
def test_foreseeable_errors_are_one_line_without_a_traceback(
    cub_root, tmp_path, capsys, case, extra, message
):
    if "run.tensorboard=true" in extra and importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    root = broken_cub(cub_root, tmp_path, case) if case != "ok" else cub_root
    overrides = tiny_overrides(root, tmp_path / "runs") + ["train.epochs=1", *extra]
    argv = ["--config", str(DEFAULTS), "--no-progress", "--set", *overrides]
    assert train_script().main(argv) == 1  # raised nothing: an error the script reported
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and message.lower() in stderr.lower(), stderr


def test_a_failing_train_process_prints_no_traceback(tmp_path):
    overrides = tiny_overrides(tmp_path / "nowhere", tmp_path / "runs") + ["train.epochs=1"]
    done = subprocess.run(train_command(*overrides), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "\nerror: dataset root" in done.stderr


def _metrics_rows(run_dir: Path) -> int:
    try:
        return len(pd.read_csv(run_dir / "metrics.csv"))
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return 0


def _sigint_as_in_a_terminal() -> None:
    """In the child before exec: SIGINT back to its default action. A job that a non-interactive
    shell started in the background inherits SIGINT ignored (POSIX), and Python then never raises
    KeyboardInterrupt; a terminal's Ctrl-C reaches a process whose SIGINT is not ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_and_wait(command: list[str], run_dir: Path, rows: int, timeout: float = 240) -> subprocess.Popen:
    """Start ``command`` and return once metrics.csv has ``rows`` rows (an epoch has finished)."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_sigint_as_in_a_terminal,
    )
    deadline = time.monotonic() + timeout
    while _metrics_rows(run_dir) < rows:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"training ended or stalled before epoch {rows}: {process.communicate()[1]}")
        time.sleep(0.2)
    return process


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_stops_cleanly_and_says_how_to_resume(cub_root, tmp_path, sig, code):
    overrides = tiny_overrides(cub_root, tmp_path) + ["train.epochs=200"]
    process = _start_and_wait(train_command(*overrides), tmp_path / "t", rows=1)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr[-2000:]
    assert "Traceback" not in stderr and "--resume auto" in stderr, stderr[-2000:]
    assert not (tmp_path / "t" / "run.lock").exists()  # released on the way out


def test_sigkill_mid_epoch_resumes_without_a_missing_or_doubled_epoch(cub_root, tmp_path):
    overrides = tiny_overrides(cub_root, tmp_path) + ["train.epochs=200"]
    process = _start_and_wait(train_command(*overrides), tmp_path / "t", rows=2)
    time.sleep(0.3)  # somewhere inside a later epoch
    process.kill()
    process.communicate()
    assert (tmp_path / "t" / "run.lock").exists()  # a dead process's lock: stale, taken over below
    done = _metrics_rows(tmp_path / "t")
    result = run(cub_root, tmp_path, f"train.epochs={done + 2}", resume="auto")
    epochs = list(pd.read_csv(result.run_dir / "metrics.csv")["epoch"])
    assert epochs == list(range(done + 2))


@pytest.fixture
def live_process():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield sleeper
    sleeper.kill()
    sleeper.wait()


def _lock(run_dir: Path, pid: int, host: str | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.lock").write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid}))


def test_a_run_in_use_is_refused_and_a_stale_lock_taken_over(cub_root, tmp_path, live_process, capsys):
    _lock(tmp_path / "t", live_process.pid)
    with pytest.raises(RunInUseError, match=f"in use by PID {live_process.pid} on {socket.gethostname()}"):
        run(cub_root, tmp_path, "train.epochs=1")
    argv = ["--config", str(DEFAULTS), "--set", *tiny_overrides(cub_root, tmp_path), "train.epochs=1"]
    assert train_script().main(argv) == 1
    assert f"error: {tmp_path / 't'} is in use by PID" in capsys.readouterr().err
    live_process.kill()
    live_process.wait()
    result = run(cub_root, tmp_path, "train.epochs=1")  # the holder is gone: its lock is stale
    assert [row["epoch"] for row in result.history] == [0]
    assert not (tmp_path / "t" / "run.lock").exists()


def test_a_lock_from_another_host_counts_as_held(cub_root, tmp_path):
    _lock(tmp_path / "t", os.getpid(), host="another-node")
    with pytest.raises(RunInUseError, match="another-node"):
        run(cub_root, tmp_path, "train.epochs=1")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("name", "target", "argv"),
    [
        ("evaluate", "evaluate_checkpoint", ["--checkpoint", "best.pt"]),
        ("predict", "load_trained", ["--checkpoint", "best.pt", "photo.jpg"]),
        ("test_fixes", "run_checks", ["--quick"]),
    ],
)
def test_ctrl_c_in_the_other_scripts_exits_130_without_a_traceback(name, target, argv, monkeypatch, capsys):
    script = _script(name)
    monkeypatch.setattr(script, target, _interrupt)
    assert script.main(argv) == 130
    assert capsys.readouterr().err.startswith("interrupted")
