"""Re-ID ranking metrics against a per-query loop over sklearn's average precision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from dual_cross_attention.retrieval.ranking import evaluate_ranking, pairwise_distance, same_file_index


def reference(qf, gf, q_pids, q_cams, g_pids, g_cams, metric="euclidean", same_file=None, max_rank=10):
    """mAP, CMC, mINP (percent) and the per-query AP (NaN: left out), one query at a time."""
    qf, gf = qf.double().numpy(), gf.double().numpy()
    if metric == "cosine":
        qf, gf = (f / np.linalg.norm(f, axis=1, keepdims=True) for f in (qf, gf))
        dist = 1 - qf @ gf.T
    else:
        dist = np.sqrt(((qf[:, None, :] - gf[None, :, :]) ** 2).sum(-1))
    ap = np.full(len(qf), np.nan)
    first, inp = [], []
    for i in range(len(qf)):
        keep = ~((g_pids == q_pids[i]) & (g_cams == q_cams[i]) & (q_cams[i] != -1))
        if same_file is not None and same_file[i] >= 0:
            keep[same_file[i]] = False
        match = g_pids[keep] == q_pids[i]
        if not match.any():
            continue
        ap[i] = 100 * average_precision_score(match, -dist[i, keep])
        hit_ranks = np.flatnonzero(match[np.argsort(dist[i, keep], kind="stable")]) + 1
        first.append(hit_ranks[0])
        inp.append(len(hit_ranks) / hit_ranks[-1])
    cmc = [100 * np.mean(np.array(first) <= r) for r in range(1, max_rank + 1)]
    return np.nanmean(ap), np.array(cmc), 100 * np.mean(inp), ap


@pytest.fixture
def market_like():
    """12 queries, 70 gallery images, 3 cameras, identities 1..6 and distractors of identity 0.

    Query 11 is identity 7, whose only gallery images come from the query's own camera.
    """
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 16)) * 0.6
    q_pids = np.append(rng.integers(1, 7, 11), 7)
    g_pids = np.concatenate([rng.integers(1, 7, 50), np.zeros(16, dtype=np.int64), [7, 7, 7, 7]])
    q_cams = np.append(rng.integers(0, 3, 11), 1)
    g_cams = np.concatenate([rng.integers(0, 3, 66), [1, 1, 1, 1]])
    qf = torch.from_numpy(centres[q_pids] + rng.normal(size=(12, 16))).float()
    gf = torch.from_numpy(centres[g_pids] + rng.normal(size=(70, 16))).float()
    return qf, gf, q_pids, q_cams, g_pids, g_cams


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_matches_a_per_query_loop_over_sklearn(market_like, metric):
    qf, gf, *labels = market_like
    mAP, cmc, mINP, ap = reference(qf, gf, *labels, metric=metric)
    got = evaluate_ranking(qf, gf, *labels, metric=metric)
    assert got.mAP == pytest.approx(mAP, abs=1e-4)
    np.testing.assert_allclose(got.cmc, cmc)
    assert got.mINP == pytest.approx(mINP, abs=1e-4)
    np.testing.assert_allclose(got.query_ap, ap, atol=1e-4)
    assert (got.num_query, got.num_left_out, got.num_gallery) == (11, 1, 70)
    assert (got.rank1, got.rank5, got.rank10) == (cmc[0], cmc[4], cmc[9])
    assert 0 < got.mINP < got.mAP < got.rank10  # a ranking neither perfect nor hopeless


def test_a_query_whose_matches_all_share_its_camera_is_left_out(market_like):
    qf, gf, q_pids, q_cams, g_pids, g_cams = market_like
    got = evaluate_ranking(qf, gf, q_pids, q_cams, g_pids, g_cams)
    assert got.num_query == 11 and np.isnan(got.query_ap[11])
    others = evaluate_ranking(qf[:11], gf, q_pids[:11], q_cams[:11], g_pids, g_cams)
    assert got.mAP == others.mAP and got.mINP == others.mINP
    # From another camera its identity's images count, and the query is scored.
    moved = q_cams.copy()
    moved[11] = 0
    assert evaluate_ranking(qf, gf, q_pids, moved, g_pids, g_cams).num_query == 12


def test_chunks_change_nothing(market_like):
    qf, gf, *labels = market_like
    whole = evaluate_ranking(qf, gf, *labels, chunk_size=1000, max_rank=20)
    chunked = evaluate_ranking(qf, gf, *labels, chunk_size=3, max_rank=20)
    np.testing.assert_array_equal(chunked.query_ap, whole.query_ap)
    np.testing.assert_array_equal(chunked.cmc, whole.cmc)
    assert chunked.mINP == whole.mINP


def test_cosine_is_euclidean_on_unit_features(market_like):
    qf, gf, *labels = market_like
    unit_q, unit_g = (f / f.norm(dim=1, keepdim=True) for f in (qf, gf))
    cosine = evaluate_ranking(qf * 5, gf * 0.1, *labels, metric="cosine")  # normalised inside
    euclidean = evaluate_ranking(unit_q, unit_g, *labels, metric="euclidean")
    np.testing.assert_allclose(cosine.query_ap, euclidean.query_ap, atol=1e-5)
    np.testing.assert_array_equal(cosine.cmc, euclidean.cmc)


def test_one_query_by_hand():
    """Gallery at 0.5, 1, 2, 3, 4 from the query; identity 1 at 0.5 (same camera: removed), 2, 4.

    Ranked after removal: miss, hit, miss, hit. AP = (1/2 + 2/4) / 2, first hit at rank 2,
    INP = 2 hits / last hit at rank 4.
    """
    qf = torch.zeros(1, 1)
    gf = torch.tensor([[0.5], [1.0], [2.0], [3.0], [4.0]])
    got = evaluate_ranking(qf, gf, [1], [0], [1, 2, 1, 3, 1], [0, 1, 1, 1, 2], metric="euclidean", max_rank=5)
    assert got.mAP == pytest.approx(50.0)
    np.testing.assert_allclose(got.cmc, [0, 100, 100, 100, 100])
    assert got.mINP == pytest.approx(50.0)


def test_without_cameras_only_the_query_image_itself_is_removed():
    """camid -1: the query's own file (distance 0) goes; its identity's other images stay, same
    "camera" or not. Ranked: 1.0 hit, 2.0 miss, 3.0 hit: AP = (1 + 2/3) / 2."""
    qf = torch.zeros(1, 1)
    gf = torch.tensor([[2.0], [0.0], [1.0], [3.0]])
    paths = ["b.jpg", "q.jpg", "c.jpg", "d.jpg"]
    own = same_file_index(["q.jpg"], paths)
    assert own.tolist() == [1]
    cams = [-1, -1, -1, -1]
    got = evaluate_ranking(
        qf, gf, [5], [-1], [6, 5, 5, 5], cams, metric="euclidean", same_file=own, max_rank=3
    )
    assert got.mAP == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert got.mINP == pytest.approx(100 * 2 / 3)
    kept = evaluate_ranking(qf, gf, [5], [-1], [6, 5, 5, 5], cams, metric="euclidean", max_rank=3)
    assert kept.mAP == pytest.approx(100 * (1 + 1 + 3 / 4) / 3)  # without same_file it finds itself first
    assert same_file_index(["x.jpg"], paths).tolist() == [-1]


def test_same_file_matches_the_reference(market_like):
    qf, gf, q_pids, q_cams, g_pids, g_cams = market_like
    gf = torch.cat([gf, qf[:4]])  # the first four queries are gallery images too
    g_pids, g_cams = np.append(g_pids, q_pids[:4]), np.append(g_cams, q_cams[:4])
    own = np.array([70, 71, 72, 73] + [-1] * 8)
    none = -np.ones(12, dtype=np.int64)
    labels = (q_pids, none, g_pids, np.where(np.arange(74) % 2 == 0, -1, g_cams))
    mAP, cmc, mINP, ap = reference(qf, gf, *labels, same_file=own)
    got = evaluate_ranking(qf, gf, *labels, metric="euclidean", same_file=own, chunk_size=5)
    np.testing.assert_allclose(got.query_ap, ap, atol=1e-4)
    assert got.mINP == pytest.approx(mINP, abs=1e-4)
    np.testing.assert_allclose(got.cmc, cmc)
    assert got.num_query == 12  # without cameras identity 7 counts too


def test_ties_are_ranked_in_gallery_order():
    """Every gallery image at the same distance: the matches rank at their gallery positions (an
    unstable sort reorders ties of this many entries)."""
    g_pids = np.full(300, 2)
    g_pids[[120, 250]] = 1
    got = evaluate_ranking(torch.ones(1, 3), torch.ones(300, 3), [1], [0], g_pids, np.ones(300))
    assert got.mAP == pytest.approx(100 * (1 / 121 + 2 / 251) / 2)
    assert got.mINP == pytest.approx(100 * 2 / 251)


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "sqeuclidean"])
def test_pairwise_distance(metric):
    a, b = torch.randn(5, 7), torch.randn(6, 7)
    squared = ((a[:, None] - b[None]) ** 2).sum(-1)
    expected = {
        "cosine": 1 - torch.nn.functional.cosine_similarity(a[:, None], b[None], dim=-1),
        "euclidean": squared.sqrt(),
        "sqeuclidean": squared,
    }[metric]
    torch.testing.assert_close(pairwise_distance(a, b, metric), expected, atol=1e-5, rtol=1e-5)


def test_clear_errors():
    qf, gf = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="no query has a true match"):
        evaluate_ranking(qf, gf, [1, 2], [0, 0], [3, 4, 5], [1, 1, 1])
    with pytest.raises(ValueError, match=r"gallery_pids must have shape \(3,\)"):
        evaluate_ranking(qf, gf, [1, 2], [0, 0], [1, 2], [1, 1, 1])
    with pytest.raises(ValueError, match="metric must be one of"):
        evaluate_ranking(qf, gf, [1, 2], [0, 0], [1, 2, 1], [1, 1, 1], metric="hamming")
    result = evaluate_ranking(qf, gf, [1, 2], [0, 0], [1, 2, 1], [1, 1, 1], max_rank=3)
    with pytest.raises(ValueError, match="max_rank >= 5"):
        _ = result.rank5
    assert set(result.summary()) == {"mAP", "rank1", "mINP", "num_query", "num_left_out", "num_gallery"}
