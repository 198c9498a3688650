"""Shared fixtures: tiny ViTs that run on a CPU in milliseconds."""

from __future__ import annotations

import pytest
import torch

# 32 px images, 8 px patches: 16 patches; 3 blocks of width 48.
TINY = dict(backbone="deit_tiny_patch16_224", img_size=32, pretrained=False)
TINY_KWARGS = {"patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 3}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32)
