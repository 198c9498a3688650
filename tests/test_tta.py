"""Test-time flip (``eval.tta`` / ``--tta flip``): one function (``inference.flip_averaged``) for FGVC
probabilities, Re-ID embeddings and predict.py, each checked against the model run by hand on the
mirrored batch; training-time evaluation and evaluate.py (also for a Re-ID checkpoint) apply it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_reid_train import TINY as REID_TINY
from test_reid_train import reid_overrides, write_market
from torch.utils.data import DataLoader, TensorDataset

from dual_cross_attention.builders import build_reid_data
from dual_cross_attention.config import ConfigError, load_config
from dual_cross_attention.evaluation.reid import extract_embeddings
from dual_cross_attention.inference import class_probabilities
from dual_cross_attention.models import PREDICT_MODES, DualViT
from dual_cross_attention.prediction import TrainedModel, load_trained, predict_files
from dual_cross_attention.trainer import train

ROOT = Path(__file__).parents[1]
FGVC_TINY = dict(
    backbone="deit_tiny_patch16_224",
    pretrained=False,
    img_size=(32, 32),
    backbone_kwargs=dict(patch_size=8, embed_dim=48, depth=2, num_heads=3),
)


def hand_probabilities(model: DualViT, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per mode, the softmax of the logits of the images and of their mirrors, averaged by hand."""
    views = [model(images), model(torch.flip(images, dims=[3]))]  # (B, 3, H, W): mirror the width
    sa = [v.sa_logits.softmax(dim=1) for v in views]
    glca = [v.glca_logits.softmax(dim=1) for v in views]
    return {"sa": (sa[0] + sa[1]) / 2, "glca": (glca[0] + glca[1]) / 2, "sa+glca": (sum(sa) + sum(glca)) / 2}


def normed(x: torch.Tensor, bn: torch.nn.BatchNorm1d) -> torch.Tensor:
    """BatchNorm1d in eval mode, written out."""
    return (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def hand_embeddings(model: DualViT, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Re-ID: each branch's BNNeck feature of the images and their mirrors averaged, then sa+glca."""
    views = [model(images), model(torch.flip(images, dims=[3]))]
    sa = sum(normed(v.sa_features, model.backbone.head.neck) for v in views) / 2
    glca = sum(normed(v.glca_features, model.glca_head.neck) for v in views) / 2
    return {
        "sa": sa,
        "glca": glca,
        "sa+glca": torch.cat([F.normalize(sa, dim=1), F.normalize(glca, dim=1)], 1),
    }


@torch.no_grad()
def test_flip_averages_fgvc_probabilities_of_the_image_and_its_mirror():
    model = DualViT(num_classes=5, **FGVC_TINY).eval()
    images = torch.randn(3, 3, 32, 32)
    probs, out = class_probabilities(model, images, PREDICT_MODES, tta="flip")
    expected = hand_probabilities(model, images)
    plain, _ = class_probabilities(model, images, PREDICT_MODES, tta="none")
    for mode in PREDICT_MODES:
        torch.testing.assert_close(probs[mode], expected[mode])
        assert not torch.allclose(probs[mode], plain[mode])  # the mirror did change something
    torch.testing.assert_close(out.sa_logits, model(images).sa_logits)  # the output is the unflipped one


@torch.no_grad()
def test_flip_averages_reid_embeddings_per_branch_before_the_cosine():
    model = DualViT(num_classes=6, bnneck=True, **REID_TINY)
    for head in (model.backbone.head, model.glca_head):  # a trained-looking norm, not the identity
        head.neck.running_mean.normal_()
        head.neck.running_var.uniform_(0.5, 2.0)
        head.neck.weight.normal_()
    model.eval()
    images = torch.randn(5, 3, 32, 16)
    loader = DataLoader(TensorDataset(images, torch.zeros(5)), batch_size=2)  # batches of 2, 2, 1
    flipped = extract_embeddings(model, loader, torch.device("cpu"), PREDICT_MODES, tta="flip")
    plain = extract_embeddings(model, loader, torch.device("cpu"), PREDICT_MODES)
    expected = hand_embeddings(model, images)
    for mode in PREDICT_MODES:
        torch.testing.assert_close(flipped[mode], expected[mode])
        assert not torch.allclose(flipped[mode], plain[mode])
    halves = flipped["sa+glca"].split(48, dim=1)  # still two unit halves
    for half in halves:
        torch.testing.assert_close(half.norm(dim=1), torch.ones(5))


def test_predict_files_takes_the_checkpoints_eval_tta(tmp_path):
    cfg = load_config(None, ["data.dataset=synthetic", "data.img_size=32", "data.resize_size=32",
                             "eval.tta=flip", "train.device=cpu"])  # fmt: skip
    model = DualViT(num_classes=4, **FGVC_TINY).eval()
    classes = ["a", "b", "c", "d"]
    trained = TrainedModel(model, cfg, classes, torch.device("cpu"), torch.float32, tmp_path / "x.pt")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (40, 32, 3), dtype=np.uint8)).save(paths[-1])
    default, _ = predict_files(trained, paths, top_k=4)
    flip, _ = predict_files(trained, paths, top_k=4, tta="flip")
    none, _ = predict_files(trained, paths, top_k=4, tta="none")
    assert [p.probabilities for p in default] == [p.probabilities for p in flip]
    assert [p.probabilities for p in default] != [p.probabilities for p in none]
    with pytest.raises(ConfigError, match=r"eval.tta must be one of \['none', 'flip'\]"):
        load_config(None, ["eval.tta=mirror"])


def evaluate_script():
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reid_run_evaluates_with_flip_and_evaluate_py_accepts_tta_flip(tmp_path):
    market = write_market(tmp_path / "Market-1501")
    cfg = load_config(None, reid_overrides(market, tmp_path / "runs") + ["eval.tta=flip"])
    train(cfg, show_progress=False)
    checkpoint = tmp_path / "runs" / "reid" / "checkpoints" / "best.pt"
    features, out = tmp_path / "features.npz", tmp_path / "eval.json"
    argv = ["--checkpoint", str(checkpoint), "--tta", "flip", "--json", str(out), "--save-features",
            str(features), "--no-progress"]  # fmt: skip
    assert evaluate_script().main(argv) == 0
    results = json.loads(out.read_text())
    assert results["provenance"]["tta"] == "flip"
    assert results["provenance"]["protocol"] == results["protocol"]
    # training-time evaluation (eval.tta: flip) measured what evaluate.py --tta flip measures
    row = pd.read_csv(tmp_path / "runs" / "reid" / "metrics.csv").iloc[-1]
    assert row["eval_mAP_sa_glca"] == pytest.approx(results["sa+glca"]["mAP"], abs=1e-4)
    # the features saved are the flip-averaged ones, computed here by hand
    trained = load_trained(checkpoint)
    query = build_reid_data(trained.config, split="test").eval
    images = torch.stack([query[i][0] for i in range(len(query))])  # (5, 3, 32, 16)
    saved = np.load(features, allow_pickle=False)
    with torch.no_grad():
        by_hand = hand_embeddings(trained.model, images)
    for mode, expected in by_hand.items():
        np.testing.assert_allclose(saved[f"query_{mode}"], expected.numpy(), rtol=1e-4, atol=1e-5)
    assert (checkpoint.parent / "best_reid_tta-flip" / "reid_metrics.json").is_file()
