"""Shared fixtures: tiny ViTs that run on a CPU in milliseconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dual_cross_attention.config import load_config
from dual_cross_attention.data.synthetic import DemoSpec, generate_demo_dataset
from dual_cross_attention.models import DualViTOutput
from dual_cross_attention.trainer import RunResult, train

# 32 px images, 8 px patches: 16 patches; 3 blocks of width 48.
TINY = dict(backbone="deit_tiny_patch16_224", img_size=32, pretrained=False)
TINY_KWARGS = {"patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 3}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32)


@pytest.fixture(scope="session")
def cub_root(tmp_path_factory) -> Path:
    """A fabricated CUB-layout set (the demo generator at 32 px): 18 train, 9 test, 3 classes."""
    spec = DemoSpec(seed=1, image_size=32, train_per_class=6, test_per_class=3, num_classes=3)
    return generate_demo_dataset(tmp_path_factory.mktemp("data") / "cub", spec)


def tiny_overrides(cub_root: Path, out: Path, name: str = "t") -> list[str]:
    """A 2-block, 48-wide ViT on 32 px images, 2 epochs of batch 4 x 2, runs under ``out``."""
    return [
        "data.dataset=cub", f"data.root={cub_root}", "data.img_size=32", "data.resize_size=32",
        "data.num_workers=0", "model.backbone=deit_tiny_patch16_224", "model.pretrained=false",
        "model.backbone_kwargs={patch_size: 8, embed_dim: 48, depth: 2, num_heads: 3}",
        "train.epochs=2", "train.batch_size=4", "train.gradient_accumulation_steps=2", "train.base_lr=1e-3",
        "train.warmup_epochs=1", "train.device=cpu", f"run.output_dir={out}", f"run.name={name}",
    ]  # fmt: skip


def run(cub_root: Path, tmp_path: Path, *extra: str, name: str = "t", resume: str | None = None) -> RunResult:
    """Train the tiny model on ``cub_root`` with ``extra`` overrides, in-process."""
    cfg = load_config(None, tiny_overrides(cub_root, tmp_path, name) + list(extra))
    return train(cfg, resume=resume, show_progress=False)


class LinearClassifier(nn.Module):
    """A linear model that speaks DualViTOutput (SA only): training arithmetic checkable by hand."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> DualViTOutput:
        return DualViTOutput(sa_logits=self.fc(x), sa_features=x)
