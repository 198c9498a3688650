"""DCAL models: the dual cross-attention ViT and the backbone it drives."""

from .backbone import UnsupportedBackboneError, create_backbone, load_pretrained_weights
from .dual_vit import (
    GLCA_KVS,
    GLCA_READOUTS,
    GLCA_SELECTS,
    PREDICT_MODES,
    DualViT,
    DualViTOutput,
    combine_probabilities,
)
from .pairs import random_derangement

__all__ = [
    "GLCA_KVS",
    "GLCA_READOUTS",
    "GLCA_SELECTS",
    "PREDICT_MODES",
    "DualViT",
    "DualViTOutput",
    "UnsupportedBackboneError",
    "combine_probabilities",
    "create_backbone",
    "load_pretrained_weights",
    "random_derangement",
]
