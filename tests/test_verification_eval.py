"""Verification of a Re-ID checkpoint: the threshold rule (chosen on validation pairs, applied unchanged
to test pairs), the run's generated pairs (written to the run folder, reused, same seed same file),
the per-epoch validation AUC the trainer selects best.pt on, and evaluate.py --pairs --json, whose
AUC is checked against scikit-learn on cosines computed image by image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from verification_helpers import MODES, cosines_by_hand, load_script, train_with_validation

from dual_cross_attention.checkpoint import load_checkpoint
from dual_cross_attention.config import ConfigError, apply_overrides, load_config
from dual_cross_attention.errors import UsageError
from dual_cross_attention.prediction import load_trained
from dual_cross_attention.verification import Pair, read_pairs, write_pairs
from dual_cross_attention.verification.run_pairs import run_pairs
from dual_cross_attention.verification.scoring import PairScores, evaluate_pairs

VERIFICATION_KEYS = {
    "auc", "eer", "eer_threshold", "tar_at_far", "tar_at_far_reason", "threshold", "accuracy",
    "accuracy_reason", "num_positives", "num_negatives",
}  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_with_validation(tmp_path_factory.mktemp("verify_eval"))


@pytest.fixture(scope="module")
def evaluate_script():
    return load_script("evaluate.py")


def scored(scores: list[float], same: list[int], source: str) -> PairScores:
    pairs = [Pair(f"{source}/a{i}.jpg", f"{source}/b{i}.jpg", bool(s)) for i, s in enumerate(same)]
    return PairScores(pairs, {"sa": np.array(scores, dtype=np.float64)}, source)


def best_accuracy_threshold_by_brute_force(scores: np.ndarray, same: np.ndarray) -> float:
    """The midpoint between neighbouring distinct scores with the highest accuracy (lowest first on ties)."""
    distinct = np.unique(scores)
    candidates = np.concatenate(([distinct[0] - 1], (distinct[:-1] + distinct[1:]) / 2, [distinct[-1] + 1]))
    accuracy = [np.mean((scores >= t) == same) for t in candidates]
    return float(candidates[int(np.argmax(accuracy))])


def test_the_validation_threshold_is_applied_unchanged_to_the_test_pairs(tmp_path):
    # Validation separates at 0.5; on the test pairs the best threshold would be 0.75.
    val = scored([0.1, 0.2, 0.4, 0.6, 0.7, 0.9], [0, 0, 0, 1, 1, 1], "val")
    test = scored([0.3, 0.55, 0.6, 0.7, 0.8, 0.9, 0.95], [0, 0, 0, 0, 1, 1, 1], "test")
    evaluation = evaluate_pairs(test, val=val, out_dir=tmp_path)
    chosen = best_accuracy_threshold_by_brute_force(val.scores["sa"], val.same)
    result = evaluation.results["sa"]
    assert result.threshold == pytest.approx(chosen) == pytest.approx(0.5)
    assert result.threshold != pytest.approx(
        best_accuracy_threshold_by_brute_force(test.scores["sa"], test.same)
    )
    assert result.accuracy == pytest.approx(4 / 7)  # 0.55, 0.6, 0.7 accepted wrongly; the rest right
    assert "validation pairs val" in evaluation.threshold_source
    assert [p.name for p in evaluation.files] == ["roc.png", "scores.png"]
    stored = evaluate_pairs(test, thresholds={"sa": 0.65}, threshold_source="stored")
    assert stored.results["sa"].threshold == 0.65 and stored.results["sa"].accuracy == pytest.approx(6 / 7)
    unknown = evaluate_pairs(test, threshold_source="no threshold is known: none stored").as_json()["sa"]
    assert unknown["accuracy"] is None and unknown["accuracy_reason"].startswith("n/a: no threshold is known")
    with pytest.raises(UsageError, match="not both"):
        evaluate_pairs(test, val=val, thresholds={"sa": 0.5})


def test_the_trainer_scores_validation_pairs_and_stores_their_thresholds(run):
    history = pd.read_csv(run.run_dir / "metrics.csv")
    assert {f"eval_auc_{m.replace('+', '_')}" for m in MODES} <= set(history.columns)
    assert run.best_metric == pytest.approx(history["eval_auc_sa_glca"].iloc[-1])  # select_metric: auc
    state = load_checkpoint(run.run_dir / "checkpoints" / "best.pt")
    val_file = run.run_dir / "verification" / "val_pairs.csv"
    assert state["verification"]["pairs"] == str(val_file)
    for mode in MODES:
        stored = state["verification"]["thresholds"][mode]
        assert stored == pytest.approx(history[f"eval_threshold_{mode.replace('+', '_')}"].iloc[-1])
    # The validation pairs come from the 2 held-out identities only (never a training identity).
    trained = load_trained(run.run_dir / "checkpoints" / "best.pt")
    cfg = trained.config
    pairs = read_pairs(val_file, root=cfg.data.root)
    pids = {int(Path(p).name.split("_")[0]) for pair in pairs for p in (pair.path_a, pair.path_b)}
    assert len(pids) == 2 and not pids & {int(c) for c in trained.classes}
    assert all((Path(p.path_a).name[:4] == Path(p.path_b).name[:4]) == p.same for p in pairs)
    # The AUC the trainer logged from the ranking's embeddings = scoring those pairs afresh.
    by_hand = cosines_by_hand(trained, Path(cfg.data.root), pairs)
    same = [p.same for p in pairs]
    for mode in MODES:
        auc = roc_auc_score(same, by_hand[mode])
        assert history[f"eval_auc_{mode.replace('+', '_')}"].iloc[-1] == pytest.approx(auc, abs=1e-9)


def test_generated_pairs_are_written_to_the_run_folder_and_reused(run, caplog):
    cfg = load_trained(run.run_dir / "checkpoints" / "best.pt").config
    first = run_pairs(cfg, "test", run.run_dir)
    path = run.run_dir / "verification" / "test_pairs.csv"
    assert first.path == path and path.is_file() and not first.reused
    written = path.read_bytes()
    again = run_pairs(cfg, "test", run.run_dir)
    assert again.reused and again.pairs == first.pairs and path.read_bytes() == written
    images = {p for pair in first.pairs for p in (pair.path_a, pair.path_b)}
    assert all(Path(p).name[:4] in {"0020", "0021", "0022", "0023", "0024"} for p in images)  # no 0000, no -1
    other = apply_overrides(cfg, ["verification.pairs_seed=1", "verification.num_negatives=5"])
    redrawn = run_pairs(other, "test", run.run_dir)
    assert not redrawn.reused and sum(not p.same for p in redrawn.pairs) == 5
    back = run_pairs(cfg, "test", run.run_dir)  # the first settings again: the very same file
    assert not back.reused and back.pairs == first.pairs and path.read_bytes() == written
    val = run_pairs(cfg, "val", run.run_dir)
    assert val.reused  # the file the trainer wrote
    with pytest.raises(UsageError, match="has none"):
        run_pairs(
            apply_overrides(cfg, ["data.val_fraction=0", "train.select_metric=auto"]), "val", run.run_dir
        )


def test_hard_negatives_come_only_from_the_listed_identities(run, tmp_path):
    cfg = load_trained(run.run_dir / "checkpoints" / "best.pt").config
    listed = tmp_path / "twins.csv"
    listed.write_text("identity_a,identity_b\n20,21\n23,99\n")  # 99: not a test identity, does not apply
    hard = apply_overrides(cfg, [f"verification.hard_negatives={listed}"])
    pairs = run_pairs(hard, "test", tmp_path / "hard_run").pairs
    negatives = [p for p in pairs if not p.same]
    assert negatives and {frozenset(Path(x).name[:4] for x in (p.path_a, p.path_b)) for p in negatives} == {
        frozenset({"0020", "0021"})
    }
    listed.write_text("identity_a,identity_b\n98,99\n")
    with pytest.raises(UsageError, match="none of the 1 identity pairs"):
        run_pairs(hard, "test", tmp_path / "other_run")


def test_select_metric_rules():
    reid = ["data.dataset=market1501", "data.img_size=[256, 128]", "train.batch_size=64"]
    assert (
        load_config(None, [*reid, "data.val_fraction=0.1", "train.select_metric=auc"]).train.select_metric
        == "auc"
    )
    with pytest.raises(ConfigError, match="auc .* needs a Re-ID dataset and data.val_fraction > 0"):
        load_config(None, [*reid, "data.val_fraction=0", "train.select_metric=auc"])
    with pytest.raises(ConfigError, match="mAP is a Re-ID metric"):
        load_config(None, ["train.select_metric=mAP"])
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(None, ["train.select_metric=loss"])


def test_evaluate_py_pairs_json(run, evaluate_script, tmp_path, capsys):
    checkpoint = run.run_dir / "checkpoints" / "best.pt"
    stored = load_checkpoint(checkpoint)["verification"]["thresholds"]
    out = tmp_path / "pairs.json"
    assert (
        evaluate_script.main(
            ["--checkpoint", str(checkpoint), "--pairs", "--json", str(out), "--no-progress"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "threshold: chosen on the validation pairs" in printed and "stored in best.pt" in printed
    results = json.loads(out.read_text())
    assert results["task"] == "verification" and results["pairs"].endswith("verification/test_pairs.csv")
    trained = load_trained(checkpoint)
    pairs = read_pairs(results["pairs"], root=trained.config.data.root)
    by_hand = cosines_by_hand(trained, Path(trained.config.data.root), pairs)
    same = np.array([p.same for p in pairs])
    for mode in MODES:
        values = results[mode]
        assert set(values) == VERIFICATION_KEYS and set(values["tar_at_far"]) == {"1e-01", "1e-02", "1e-03"}
        scores = by_hand[mode]
        assert values["auc"] == pytest.approx(roc_auc_score(same, scores), abs=1e-9)
        assert values["threshold"] == stored[mode]  # the stored threshold, unchanged
        assert values["accuracy"] == pytest.approx(np.mean((scores >= stored[mode]) == same), abs=1e-9)
        assert (
            values["tar_at_far"]["1e-03"] is None and "1000 negatives" in values["tar_at_far_reason"]["1e-03"]
        )
    folder = checkpoint.parent / "best_pairs"
    assert {p.name for p in folder.iterdir()} == {"roc.png", "scores.png", "verification.json"}

    # --val-pairs: the thresholds are chosen on the run's validation pairs (the trainer's very rule).
    out_val = tmp_path / "val.json"
    argv = [
        "--checkpoint",
        str(checkpoint),
        "--pairs",
        "--val-pairs",
        "--json",
        str(out_val),
        "--no-progress",
    ]
    assert evaluate_script.main(argv) == 0
    chosen = json.loads(out_val.read_text())
    assert chosen["val_pairs"].endswith("val_pairs.csv")
    for mode in MODES:
        assert chosen[mode]["threshold"] == pytest.approx(stored[mode], abs=1e-5)  # re-embedded: fp noise
        assert chosen[mode]["auc"] == pytest.approx(results[mode]["auc"], abs=1e-12)

    # An identity mapping: pairs drawn from it and written to the output folder.
    mapping = tmp_path / "ids.json"
    test_images = sorted({p.path_a for p in pairs} | {p.path_b for p in pairs})
    mapping.write_text(json.dumps({name: [p for p in test_images if Path(p).name.startswith(name)]
                                   for name in ("0020", "0021", "0022")}))  # fmt: skip
    argv = [
        "--checkpoint",
        str(checkpoint),
        "--pairs",
        str(mapping),
        "--out",
        str(tmp_path / "m"),
        "--no-progress",
    ]
    assert evaluate_script.main(argv) == 0
    assert len(read_pairs(tmp_path / "m" / "ids_pairs.csv")) == 2 * 3 * 6  # 18 positives, as many negatives
    # The threshold is never chosen on the measured pairs.
    write_pairs(pairs, tmp_path / "same.csv")
    argv = ["--checkpoint", str(checkpoint), "--pairs", str(tmp_path / "same.csv"), "--val-pairs",
            str(tmp_path / "same.csv"), "--no-progress"]  # fmt: skip
    assert evaluate_script.main(argv) == 1
    assert "share pairs" in capsys.readouterr().err
