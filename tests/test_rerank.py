"""k-reciprocal re-ranking: the chunked, sparse version equals a dense transcription of the paper."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dual_cross_attention.retrieval.ranking import evaluate_ranking, rank_distance_chunks
from dual_cross_attention.retrieval.rerank import (
    RerankParams,
    _stable_smallest,
    reranked_distance_matrix,
    reranked_distances,
)


def dense_rerank(query: np.ndarray, gallery: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    """Zhong et al. 2017, step by step on (N, N) float64 matrices, one image at a time."""
    x = np.concatenate([query, gallery]).astype(np.float64)
    num, num_query = len(x), len(query)
    dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    dist = dist / dist.max(axis=1, keepdims=True)
    rank = np.argsort(dist, axis=1, kind="stable")

    def k_reciprocal(i: int, k: int) -> set[int]:
        return {int(j) for j in rank[i, : k + 1] if i in rank[j, : k + 1]}

    half = int(np.around(k1 / 2))
    v = np.zeros((num, num))
    for i in range(num):
        base = k_reciprocal(i, k1)
        expanded = set(base)
        for c in base:
            candidate = k_reciprocal(c, half)
            if len(candidate & base) > 2 / 3 * len(candidate):
                expanded |= candidate
        members = sorted(expanded)
        weight = np.exp(-dist[i, members])
        v[i, members] = weight / weight.sum()
    if k2 > 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(num)])
    jaccard = np.empty((num_query, num - num_query))
    for i in range(num_query):
        for j in range(num_query, num):
            jaccard[i, j - num_query] = 1 - np.minimum(v[i], v[j]).sum() / np.maximum(v[i], v[j]).sum()
    return (1 - lam) * jaccard + lam * dist[:num_query, num_query:]


@pytest.fixture
def features() -> tuple[torch.Tensor, torch.Tensor]:
    # Clustered, so that k-reciprocal sets overlap and the expansion step actually fires.
    gen = torch.Generator().manual_seed(3)
    centres = torch.randn(6, 8, generator=gen) * 2
    points = centres[torch.randint(0, 6, (52,), generator=gen)] + torch.randn(52, 8, generator=gen)
    return points[:12], points[12:]


@pytest.mark.parametrize(("k1", "k2", "lam"), [(20, 6, 0.3), (5, 1, 0.5), (7, 3, 0.0)])
def test_equals_the_dense_algorithm(features, k1, k2, lam):
    query, gallery = features
    expected = dense_rerank(query.numpy(), gallery.numpy(), k1, k2, lam)
    params = RerankParams(k1=k1, k2=k2, lambda_value=lam)
    for chunk_size in (5, 256):  # chunks that split the queries and the gallery, and one that does not
        got = reranked_distance_matrix(query, gallery, params, chunk_size=chunk_size)
        assert got.shape == (12, 40)
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-5, rtol=0)


def test_expansion_and_jaccard_change_the_distance(features):
    """Guards the test above: re-ranking is far from the plain normalised distance here."""
    query, gallery = features
    plain = dense_rerank(query.numpy(), gallery.numpy(), 20, 6, 1.0)
    reranked = reranked_distance_matrix(query, gallery).numpy()
    assert np.abs(reranked - plain).max() > 0.1
    without_expansion = reranked_distance_matrix(query, gallery, RerankParams(k2=1)).numpy()
    assert np.abs(reranked - without_expansion).max() > 0.01


def test_normalize_is_rerank_on_unit_features(features):
    query, gallery = features
    unit = [f / f.norm(dim=1, keepdim=True) for f in features]
    got = reranked_distance_matrix(query * 3, gallery * 3, normalize=True)
    np.testing.assert_allclose(got.numpy(), dense_rerank(*(u.numpy() for u in unit), 20, 6, 0.3), atol=1e-5)


def test_evaluate_ranking_ranks_by_the_reranked_distances(features):
    query, gallery = features
    gen = torch.Generator().manual_seed(4)
    q_pids, g_pids = torch.randint(0, 4, (12,), generator=gen), torch.randint(0, 4, (40,), generator=gen)
    q_cams, g_cams = torch.zeros(12, dtype=torch.int64), torch.ones(40, dtype=torch.int64)
    labels = (q_pids, q_cams, g_pids, g_cams)
    got = evaluate_ranking(query, gallery, *labels, metric="euclidean", chunk_size=5, rerank=True)
    expected = torch.from_numpy(dense_rerank(query.numpy(), gallery.numpy(), 20, 6, 0.3)).float()
    direct = rank_distance_chunks([(0, expected)], *labels)
    assert got.mAP == pytest.approx(direct.mAP, abs=1e-6)
    np.testing.assert_allclose(got.cmc, direct.cmc)
    plain = evaluate_ranking(query, gallery, *labels, metric="euclidean")
    assert got.mAP != pytest.approx(plain.mAP)  # it did rank by something else


def test_chunks_cover_the_queries_in_order(features):
    query, gallery = features
    chunks = list(reranked_distances(query, gallery, chunk_size=5))
    assert [start for start, _ in chunks] == [0, 5, 10]
    assert [len(dist) for _, dist in chunks] == [5, 5, 2]


def test_too_few_images_for_k1_is_an_error():
    with pytest.raises(ValueError, match="at least 21 images"):
        reranked_distances(torch.randn(3, 4), torch.randn(10, 4))


def test_nearest_neighbours_are_a_stable_sorts_first_k():
    values = torch.randint(0, 4, (6, 300)).float()  # ties everywhere, also across the k-th value
    for k in (1, 21, 150):
        expected = torch.sort(values, dim=1, stable=True).indices[:, :k]
        assert torch.equal(_stable_smallest(values, k), expected)
