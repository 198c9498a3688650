"""evaluate.py --visualize for Re-ID: the matches picture (its size and its green/red frames read
back from the PNG's pixels), the ranking it shows against a brute-force ranking under the
protocol, and a tiny checkpoint evaluated end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb
from PIL import Image
from test_reid_train import reid_overrides, write_market

from dual_cross_attention.config import load_config
from dual_cross_attention.evaluation import reid_checkpoint
from dual_cross_attention.evaluation.checkpoint_eval import evaluate_checkpoint
from dual_cross_attention.evaluation.reid_checkpoint import query_distances, top_matches
from dual_cross_attention.retrieval.ranking import same_file_index
from dual_cross_attention.retrieval.rerank import reranked_distance_matrix
from dual_cross_attention.trainer import train
from dual_cross_attention.visualize import CORRECT, WRONG
from dual_cross_attention.visualize_reid import (
    GalleryMatch,
    ReIDExample,
    draw_reid_matches,
    reid_matches_size,
)

# The layout written out by hand (pixels): margin 10, panels 100 x 200, gaps 10, 30 more before
# the gallery, a 28 px caption band, rows of 34 (titles) + 200 + 10.
WIDTH, HEADER, ROW, TITLE = 10 + 12 * 100 + 11 * 10 + 30 + 10, 28, 244, 34


def gallery_box(row: int, rank: int) -> tuple[int, int]:
    """(left, top) pixel of the rank-th (1-based) gallery panel of a row."""
    return 10 + (rank + 1) * 110 + 30, HEADER + row * ROW + TITLE


def noise(rng: np.random.Generator, h: int = 32, w: int = 16) -> np.ndarray:
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


def fabricated(correct: list[list[bool]], seed: int = 0) -> list[ReIDExample]:
    rng = np.random.default_rng(seed)
    examples = []
    for i, row in enumerate(correct):
        matches = [
            GalleryMatch(noise(rng), pid=i if ok else 100 + r, camid=r % 3, distance=0.1 * r, correct=ok)
            for r, ok in enumerate(row)
        ]
        rollout = rng.random((4, 2)) if i % 2 == 0 else None  # an odd row: a model without GLCA
        selected = np.array([0, 5]) if rollout is not None else np.zeros(0, np.int64)
        examples.append(ReIDExample(noise(rng), i, 0, rollout, selected, matches))
    return examples


@pytest.mark.parametrize("n", [1, 3])
def test_picture_has_the_documented_size(tmp_path, n):
    assert reid_matches_size(n) == (WIDTH, HEADER + n * ROW)
    correct = [[r % 2 == 0 for r in range(10)]] * n
    path = draw_reid_matches(fabricated(correct), tmp_path / "m.png", caption="top-10")
    with Image.open(path) as image:
        assert image.size == (WIDTH, HEADER + n * ROW) and image.mode == "RGBA"


def test_frames_are_green_for_the_right_identity_red_for_another(tmp_path):
    correct = [[True, False, False, True, False, True, True, False, False, True], [False, True, True]]
    path = draw_reid_matches(fabricated(correct), tmp_path / "m.png")
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)  # (H, W, 3)
    for row, marks in enumerate(correct):
        for rank in range(1, 11):
            left, top = gallery_box(row, rank)
            # The frame is centred on the panel's edges: sample the left and the top edge.
            samples = [pixels[top + 100, left], pixels[top, left + 50]]
            if rank > len(marks):  # no match: the slot is left blank
                assert all((s == 255).all() for s in samples), (row, rank)
                continue
            expected = np.array(to_rgb(CORRECT if marks[rank - 1] else WRONG)) * 255
            for s in samples:
                assert np.abs(s - expected).max() <= 8, (row, rank, s, expected)


def brute_force(q, g, q_pids, q_cams, g_pids, g_cams, metric, q_paths=None, g_paths=None) -> list[list[int]]:
    """Top-10 gallery indices per query, written out: distances in float64, removed entries skipped."""
    q, g = q.double().numpy(), g.double().numpy()
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
    ranked = []
    for i in range(len(q)):
        d = 1 - g @ q[i] if metric == "cosine" else np.linalg.norm(g - q[i], axis=1)
        keep = []
        for j in np.argsort(d, kind="stable"):
            if q_cams[i] == -1:
                removed = q_paths[i] == g_paths[j]
            else:
                removed = g_pids[j] == q_pids[i] and g_cams[j] == q_cams[i]
            if not removed:
                keep.append(int(j))
        ranked.append(keep[:10])
    return ranked


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_shown_ranking_is_the_protocol_ranking(metric):
    rng = np.random.default_rng(1)
    q, g = torch.randn(7, 6), torch.randn(40, 6)
    q_pids, g_pids = rng.integers(0, 4, 7), rng.integers(0, 4, 40)
    q_cams, g_cams = rng.integers(0, 3, 7), rng.integers(0, 3, 40)
    g[:5] = q[0] + 0.01 * torch.randn(5, 6)  # near duplicates, same id and camera for some: removed
    g_pids[:5], g_cams[:5] = q_pids[0], np.array([q_cams[0]] * 3 + [(q_cams[0] + 1) % 3] * 2)
    indices = [0, 2, 3, 6]
    shown = top_matches(
        query_distances(q, g, indices, metric), q_pids[indices], q_cams[indices], g_pids, g_cams
    )
    expected = brute_force(q[indices], g, q_pids[indices], q_cams[indices], g_pids, g_cams, metric)
    assert [row.tolist() for row in shown] == expected
    assert not {0, 1, 2} & set(shown[0].tolist()) and {3, 4} <= set(shown[0].tolist())

    # No cameras: only each query's own file leaves its gallery (queries are gallery images here).
    paths = [f"img{j}.jpg" for j in range(40)]
    q_paths = [paths[j] for j in (3, 9, 20, 33, 39, 1, 0)]
    q_nocam, g_nocam = g[[3, 9, 20, 33, 39, 1, 0]], np.full(40, -1)
    own = same_file_index([q_paths[i] for i in indices], paths)
    shown = top_matches(
        query_distances(q_nocam, g, indices, metric), q_pids[indices], np.full(4, -1), g_pids, g_nocam, own
    )
    expected = brute_force(
        q_nocam[indices], g, q_pids[indices], np.full(4, -1), g_pids, g_nocam, metric,
        [q_paths[i] for i in indices], paths,
    )  # fmt: skip
    assert [row.tolist() for row in shown] == expected
    assert all(own[r] not in row.tolist() for r, row in enumerate(shown))


def test_reranked_distances_are_the_rows_the_metrics_used():
    q, g = torch.randn(8, 5), torch.randn(30, 5)
    rows = query_distances(q, g, [1, 6, 7], "cosine", rerank=True)
    torch.testing.assert_close(rows, reranked_distance_matrix(q, g, normalize=True)[[1, 6, 7]])


# end to end


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("vis_reid")
    market = write_market(root / "Market-1501")
    result = train(load_config(None, reid_overrides(market, root / "runs")), show_progress=False)
    return root / "runs" / "reid" / "checkpoints" / "best.pt", result


def test_evaluate_checkpoint_draws_the_matches(checkpoint, tmp_path, monkeypatch):
    path, _ = checkpoint
    drawn = []

    def keep(examples, out_png, caption=""):
        drawn.append((examples, caption))
        return draw_reid_matches(examples, out_png, caption)

    monkeypatch.setattr(reid_checkpoint, "draw_reid_matches", keep)
    features = tmp_path / "features.npz"
    report = evaluate_checkpoint(
        path, out_dir=tmp_path / "eval", visualize=2, throughput_iterations=0, save_features=features
    )
    picture = tmp_path / "eval" / "reid_matches.png"
    assert picture in report.files
    with Image.open(picture) as image:
        assert image.size == reid_matches_size(2)
    ((examples, caption),) = drawn
    assert "sa+glca" in caption and "same-identity-same-camera" in caption
    z = np.load(features, allow_pickle=False)
    q, g = torch.from_numpy(z["query_sa+glca"]), torch.from_numpy(z["gallery_sa+glca"])
    indices = [0, 4]  # two queries spread over five
    expected = brute_force(q[indices], g, z["query_pids"][indices], z["query_camids"][indices],
                           z["gallery_pids"], z["gallery_camids"], "cosine")  # fmt: skip
    for example, i, best in zip(examples, indices, expected, strict=True):
        assert example.pid == z["query_pids"][i] and example.image.shape == (32, 16, 3)
        assert example.rollout.shape == (4, 2) and 0 < len(example.selected) <= 8  # 8 x 8 px patches
        assert len(example.matches) == 10
        assert [m.pid for m in example.matches] == z["gallery_pids"][best].tolist()
        assert [m.correct for m in example.matches] == (z["gallery_pids"][best] == example.pid).tolist()
        d = 1 - torch.nn.functional.normalize(g[best], dim=1) @ torch.nn.functional.normalize(q[i], dim=0)
        np.testing.assert_allclose([m.distance for m in example.matches], d.numpy(), atol=1e-5)
