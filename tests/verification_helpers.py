"""A tiny Re-ID checkpoint with validation identities, for test_verification_eval.py and test_verify.py,
and an independent way to score a pair: one image per forward, cosine written out with numpy."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from test_reid_train import reid_overrides, write_market

from dual_cross_attention.config import load_config
from dual_cross_attention.data import load_rgb
from dual_cross_attention.data.reid_transforms import build_reid_eval_transform
from dual_cross_attention.evaluation.reid import embeddings
from dual_cross_attention.prediction import TrainedModel
from dual_cross_attention.trainer import RunResult, train
from dual_cross_attention.verification import Pair

ROOT = Path(__file__).parents[1]
MODES = ("sa", "glca", "sa+glca")


def train_with_validation(base: Path, *extra: str) -> RunResult:
    """One epoch of the tiny Re-ID model on a fabricated Market-1501 (8 train ids, 2 of them held
    out as validation identities), best.pt selected on the validation pairs' AUC."""
    root = write_market(base / "Market-1501")
    overrides = reid_overrides(root, base / "runs") + ["data.val_fraction=0.25", "train.select_metric=auc"]
    return train(load_config(None, overrides + list(extra)), show_progress=False)


@torch.no_grad()
def cosines_by_hand(trained: TrainedModel, root: Path, pairs: Sequence[Pair]) -> dict[str, np.ndarray]:
    """(N,) cosine per mode of each pair: every image through the model on its own (once), then
    a.b / (|a| |b|) in float64."""
    transform = build_reid_eval_transform((32, 16), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # the tiny run's
    vectors = {}
    for path in dict.fromkeys(p for pair in pairs for p in (pair.path_a, pair.path_b)):
        out = trained.model.eval()(transform(load_rgb(root / path)).unsqueeze(0))
        vectors[path] = {m: v[0].double().numpy() for m, v in embeddings(trained.model, out, MODES).items()}

    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    return {m: np.array([cosine(vectors[p.path_a][m], vectors[p.path_b][m]) for p in pairs]) for m in MODES}


def load_script(name: str) -> ModuleType:
    """A top-level script (evaluate.py, verify.py) as a module, to call its main() in-process."""
    spec = importlib.util.spec_from_file_location(f"script_{Path(name).stem}", ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
