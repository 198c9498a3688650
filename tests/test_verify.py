"""verify.py on a tiny trained Re-ID checkpoint: the printed similarity against cosines computed image by
image, the decision at a given, a stored and no threshold, the picture's size, many pairs with an
unreadable and a missing file reported and skipped, and the exit codes (error: message, no traceback)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from verification_helpers import MODES, ROOT, cosines_by_hand, load_script, train_with_validation

from dual_cross_attention.checkpoint import load_checkpoint, save_checkpoint
from dual_cross_attention.prediction import load_trained
from dual_cross_attention.verification import Pair
from dual_cross_attention.verification.pictures import PAIR_INCHES, figure_pixels


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return train_with_validation(tmp_path_factory.mktemp("verify")).run_dir / "checkpoints" / "best.pt"


@pytest.fixture(scope="module")
def verify():
    return load_script("verify.py").main


@pytest.fixture(scope="module")
def images(checkpoint) -> dict[str, Path]:
    root = Path(load_trained(checkpoint).config.data.root)
    return {
        "query": next((root / "query").glob("0020_*.jpg")),
        "same": sorted((root / "bounding_box_test").glob("0020_*.jpg"))[0],
        "other": sorted((root / "bounding_box_test").glob("0021_*.jpg"))[0],
    }


def printed_cosines(text: str) -> dict[str, float]:
    return {m: float(v) for m, v in re.findall(r"^(sa\+glca|sa|glca) +(-?\d\.\d{4})", text, flags=re.M)}


def test_one_pair_prints_the_similarity_and_the_decision(checkpoint, verify, images, capsys):
    trained = load_trained(checkpoint)
    stored = load_checkpoint(checkpoint)["verification"]["thresholds"]
    root = Path(trained.config.data.root)
    pair = Pair(str(images["query"].relative_to(root)), str(images["same"].relative_to(root)), True)
    by_hand = {m: float(v[0]) for m, v in cosines_by_hand(trained, root, [pair]).items()}
    argv = ["--checkpoint", str(checkpoint), str(images["query"]), str(images["same"])]
    assert verify(argv) == 0
    text = capsys.readouterr().out
    assert printed_cosines(text) == pytest.approx({m: round(by_hand[m], 4) for m in MODES}, abs=1e-4)
    expected = "same" if by_hand["sa+glca"] >= stored["sa+glca"] else "different"
    assert f"decision (sa+glca): {expected} " in text and "stored in best.pt" in text
    for threshold, decision in ((by_hand["sa"] - 0.01, "same"), (by_hand["sa"] + 0.01, "different")):
        assert verify([*argv, "--mode", "sa", "--threshold", str(threshold)]) == 0
        assert f"decision (sa): {decision} " in capsys.readouterr().out


def test_without_a_threshold_the_decision_is_unknown_and_says_how_to_get_one(
    checkpoint, verify, images, tmp_path, capsys
):
    state = load_checkpoint(checkpoint)
    del state["verification"]
    bare = save_checkpoint(state, tmp_path / "bare.pt")
    assert verify(["--checkpoint", str(bare), str(images["query"]), str(images["other"])]) == 0
    text = capsys.readouterr().out
    assert "decision (sa+glca): unknown: no threshold is known" in text and "--threshold T" in text


def test_picture_is_written_with_the_expected_size(checkpoint, verify, images, tmp_path, capsys):
    out = tmp_path / "pair.png"
    assert (
        verify(
            [
                "--checkpoint",
                str(checkpoint),
                str(images["query"]),
                str(images["other"]),
                "--picture",
                str(out),
            ]
        )
        == 0
    )
    assert f"wrote {out}" in capsys.readouterr().out
    assert Image.open(out).size == figure_pixels(PAIR_INCHES) == (480, 540)


def test_many_pairs_skip_unreadable_files(checkpoint, verify, images, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        "path_a,path_b,same\n"
        f"{images['query']},{images['same']},1\n"
        f"{images['query']},{images['other']},0\n"
        f"{images['query']},{broken},1\n"
        f"{tmp_path / 'missing.jpg'},{images['other']},0\n"
    )
    out = tmp_path / "scores.csv"
    assert verify(["--checkpoint", str(checkpoint), "--pairs", str(pairs), "--csv", str(out)]) == 0
    text = capsys.readouterr().out
    assert "skipped 2 unreadable file(s) and the 2 pair(s) they are in" in text
    assert f"{broken}: cannot decode image" in text and "missing.jpg" in text
    frame = pd.read_csv(out)
    assert len(frame) == 2 and list(frame["same"]) == [1, 0]
    assert {"cosine_sa", "cosine_glca", "cosine_sa_glca", "threshold", "decision", "correct"} <= set(
        frame.columns
    )
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text(f"path_a,path_b\n{images['query']},{images['other']}\n")
    assert verify(["--checkpoint", str(checkpoint), "--pairs", str(unlabelled)]) == 0
    assert "1 pair(s) decided" in capsys.readouterr().out


def test_exit_codes(checkpoint, verify, images, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    command = [sys.executable, str(ROOT / "verify.py"), "--checkpoint", str(checkpoint), str(images["query"])]
    done = subprocess.run([*command, str(broken)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "error: no pair could be scored" in done.stderr and f"{broken}: cannot decode image" in done.stdout
    assert verify(["--checkpoint", str(tmp_path / "none.pt"), "a.jpg", "b.jpg"]) == 1
    assert capsys.readouterr().err.startswith("error: ")
    with pytest.raises(SystemExit) as usage:  # argparse: two images, or --pairs
        verify(["--checkpoint", str(checkpoint), str(images["query"])])
    assert usage.value.code == 2
