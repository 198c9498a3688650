"""Re-ID end to end: config rules, BNNeck, the per-branch loss, the retrieval embedding, and one
epoch on a fabricated Market-1501 tree through train.py, then evaluate.py --json, whose mAP is
checked against scikit-learn on the features it saved (also under torchrun with 2 processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import average_precision_score

from dual_cross_attention.builders import build_loss, build_model, build_reid_data
from dual_cross_attention.config import ConfigError, load_config
from dual_cross_attention.errors import UsageError
from dual_cross_attention.evaluation.reid import embeddings
from dual_cross_attention.losses import ReIDLoss
from dual_cross_attention.models import DualViT
from dual_cross_attention.models.bnneck import BNNeckHead

ROOT = Path(__file__).parents[1]
TINY = dict(
    backbone="deit_tiny_patch16_224",
    pretrained=False,
    img_size=(32, 16),
    backbone_kwargs=dict(patch_size=8, embed_dim=48, depth=2, num_heads=2),
)


def write_market(root: Path, seed: int = 0) -> Path:
    """8 train ids x 4 images over 2 cameras; 5 query ids, each with 3 gallery images over 3
    cameras; one distractor (0000) and one junk image (-1) in the gallery. Noise images, 32 x 16."""
    rng = np.random.default_rng(seed)
    frame = 0

    def image(folder: str, pid: str, camera: int) -> None:
        nonlocal frame
        frame += 1
        path = root / folder / f"{pid}_c{camera}s1_{frame:06d}_00.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 16, 3), dtype=np.uint8)).save(path)

    for pid in range(1, 9):
        for i in range(4):
            image("bounding_box_train", f"{pid:04d}", i % 2 + 1)
    for pid in range(20, 25):
        image("query", f"{pid:04d}", 1)
        for camera in (1, 2, 3):
            image("bounding_box_test", f"{pid:04d}", camera)
    image("bounding_box_test", "0000", 2)
    image("bounding_box_test", "-1", 2)
    return root


@pytest.fixture(scope="module")
def market_root(tmp_path_factory) -> Path:
    return write_market(tmp_path_factory.mktemp("reid") / "Market-1501")


def reid_overrides(root: Path, out: Path, name: str = "reid") -> list[str]:
    return [
        "data.dataset=market1501", f"data.root={root}", "data.val_fraction=0", "data.img_size=[32, 16]",
        "data.num_workers=0", "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.5, 0.5, 0.5]",
        "model.backbone=deit_tiny_patch16_224", "model.pretrained=false", "model.top_ratio=0.3",
        "model.backbone_kwargs={patch_size: 8, embed_dim: 48, depth: 2, num_heads: 2}",
        "train.epochs=1", "train.batch_size=8", "reid.identities_per_batch=4", "reid.images_per_identity=2",
        "train.gradient_accumulation_steps=1", "train.optimizer=sgd", "train.base_lr=0.01",
        "train.lr_scaling=none", "train.warmup_epochs=0", "train.device=cpu", f"run.output_dir={out}",
        f"run.name={name}",
    ]  # fmt: skip


# config


def test_reid_config_rules():
    base = ["data.dataset=market1501", "data.val_fraction=0", "data.img_size=[256, 128]"]
    cfg = load_config(None, base + ["train.batch_size=64"])
    assert cfg.task == "reid" and cfg.data.img_size == [256, 128]
    with pytest.raises(ConfigError, match="must equal reid.identities_per_batch x reid.images_per_identity"):
        load_config(None, base + ["train.batch_size=32"])
    with pytest.raises(ConfigError, match=r"\[height, width\] is for the Re-ID datasets"):
        load_config(None, ["data.img_size=[256, 128]"])
    for name in ("market1501", "dukemtmc", "msmt17", "msmt17_deit", "veri776"):
        for path in ROOT.glob(f"configs/{name}*.yaml"):
            shipped = load_config(path)
            assert shipped.task == "reid" and shipped.model.top_ratio == 0.3, path
            assert shipped.train.optimizer == "sgd" and shipped.train.base_lr == 0.008, path


def test_validation_identities_are_held_out_whole(market_root, tmp_path):
    cfg = load_config(None, reid_overrides(market_root, tmp_path) + ["data.val_fraction=0.25"])
    selection, test = build_reid_data(cfg), build_reid_data(cfg, split="test")
    assert selection.eval_split == "val" and test.eval_split == "test"
    train_ids, val_ids = set(selection.train.pids.tolist()), set(selection.eval.pids.tolist())
    assert len(val_ids) == 2 and not train_ids & val_ids and len(train_ids) == 6  # 25% of 8 ids
    assert sorted(selection.train.labels.tolist()) == sorted(np.repeat(np.arange(6), 4).tolist())
    assert set(selection.gallery.pids.tolist()) == val_ids and len(selection.eval) == 2  # one query each
    assert len(selection.gallery) == 6 and selection.classes == test.classes  # test: the same train ids
    assert set(test.eval.pids.tolist()) == set(range(20, 25))
    again = build_reid_data(cfg)
    assert again.eval.paths == selection.eval.paths  # the split stays put (data.val_seed)


# model and loss


@torch.no_grad()
def test_bnneck_retrieval_feature_is_the_normed_feature():
    model = DualViT(num_classes=6, bnneck=True, **TINY)
    assert isinstance(model.backbone.head, BNNeckHead) and isinstance(model.glca_head, BNNeckHead)
    neck = model.backbone.head.neck
    neck.running_mean.normal_()
    neck.running_var.uniform_(0.5, 2.0)
    neck.weight.normal_()
    model.eval()
    out = model(torch.randn(3, 3, 32, 16))
    by_hand = (out.sa_features - neck.running_mean) / torch.sqrt(neck.running_var + neck.eps) * neck.weight
    emb = embeddings(model, out, ("sa", "glca", "sa+glca"))
    torch.testing.assert_close(emb["sa"], by_hand)
    torch.testing.assert_close(out.sa_logits, by_hand @ model.backbone.head.classifier.weight.T)
    expected = torch.cat([F.normalize(emb["sa"], dim=1), F.normalize(emb["glca"], dim=1)], dim=1)
    torch.testing.assert_close(emb["sa+glca"], expected)
    assert not neck.bias.requires_grad  # BoT: the norm's shift stays at zero


def test_bnneck_refuses_a_distilled_backbone():
    with pytest.raises(UsageError, match="distilled DeiT"):
        DualViT(num_classes=6, bnneck=True, **{**TINY, "backbone": "deit_tiny_distilled_patch16_224"})


def naive_triplet(features: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Batch-hard triplet written as loops: hardest positive and negative of each anchor."""
    losses = []
    for a in range(len(labels)):
        d = [torch.dist(features[a], features[j]) for j in range(len(labels))]
        positive = max(d[j] for j in range(len(labels)) if labels[j] == labels[a] and j != a)
        negative = min(d[j] for j in range(len(labels)) if labels[j] != labels[a])
        losses.append(torch.clamp(positive - negative + margin, min=0))
    return torch.stack(losses).mean()


def test_reid_loss_is_cross_entropy_plus_triplet_per_branch(market_root, tmp_path):
    cfg = load_config(None, reid_overrides(market_root, tmp_path))
    model, criterion = build_model(cfg, 4), build_loss(cfg)
    assert isinstance(criterion, ReIDLoss) and criterion.branches == ("sa", "glca", "pwca")
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    out = model.train()(torch.randn(8, 3, 32, 16))
    result = criterion(out, labels)
    for branch in ("sa", "glca", "pwca"):
        features, logits = getattr(out, f"{branch}_features"), getattr(out, f"{branch}_logits")
        expected = F.cross_entropy(logits, labels) + naive_triplet(features, labels, 0.3)
        torch.testing.assert_close(result.per_branch[branch], expected, rtol=1e-5, atol=1e-5)


# end to end


def script(name: str, *args: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command = [sys.executable, *launcher, str(ROOT / name), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def sklearn_map(npz: Path, mode: str) -> float:
    """mAP from the saved features with scikit-learn, the standard protocol written out per query."""
    z = np.load(npz, allow_pickle=False)
    q, g = z[f"query_{mode}"], z[f"gallery_{mode}"]
    q, g = q / np.linalg.norm(q, axis=1, keepdims=True), g / np.linalg.norm(g, axis=1, keepdims=True)
    aps = []
    for i in range(len(q)):
        keep = ~((z["gallery_pids"] == z["query_pids"][i]) & (z["gallery_camids"] == z["query_camids"][i]))
        truth = z["gallery_pids"][keep] == z["query_pids"][i]
        if truth.any():
            aps.append(average_precision_score(truth, g[keep] @ q[i]))
    return 100.0 * float(np.mean(aps))


def test_one_epoch_through_train_py_then_evaluate_py(market_root, tmp_path):
    done = script("train.py", "--no-progress", "--set", *reid_overrides(market_root, tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "best mAP" in done.stdout and "Traceback" not in done.stderr
    metrics = (tmp_path / "reid" / "metrics.csv").read_text().splitlines()
    assert "eval_mAP_sa_glca" in metrics[0] and "eval_top1_sa" not in metrics[0] and len(metrics) == 2
    checkpoint = tmp_path / "reid" / "checkpoints" / "best.pt"
    results = []
    for launcher in ((), ("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531")):
        out, features = tmp_path / f"eval{len(launcher)}.json", tmp_path / f"features{len(launcher)}.npz"
        done = script("evaluate.py", "--checkpoint", str(checkpoint), "--json", str(out), "--save-features",
                      str(features), "--no-progress", launcher=launcher)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        results.append(json.loads(out.read_text()))
        z = np.load(features, allow_pickle=False)
        assert z["gallery_pids"].tolist().count(0) == 1 and -1 not in z["gallery_pids"]  # junk left out
        for mode in ("sa", "glca", "sa+glca"):
            assert results[-1][mode]["mAP"] == pytest.approx(sklearn_map(features, mode), abs=1e-6)
    single, double = results
    assert single["num_query"] == 5 and single["num_gallery"] == 16  # 15 true + 1 distractor, junk out
    assert set(single["sa+glca"]) == {"mAP", "rank1", "rank5", "rank10", "mINP"}
    for mode in ("sa", "glca", "sa+glca"):  # 2 processes with shards of 3 + 2 queries, 8 + 8 gallery
        assert double[mode] == pytest.approx(single[mode], abs=1e-4)
