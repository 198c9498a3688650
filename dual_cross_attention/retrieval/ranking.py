"""Re-ID ranking metrics (mAP, CMC, mINP) over a query and a gallery set, chunked over queries.

Protocol (Market-1501 / DukeMTMC / MSMT17): for each query, gallery images of the same identity
taken by the same camera are removed before ranking; they are too easy to count. Where no camera
is known (camid -1 on the query) nothing is removed by camera, and ``same_file`` names the
gallery entry that is the query image itself, which is always removed. A query with no true
match left in its gallery is left out of every average (``num_left_out`` counts them).

Per query, over its ranked gallery (distances ascending, ties in gallery order):
    AP  = mean over true matches of the precision at the match's rank,
    CMC(r) = 1 if the first true match is within rank r,
    INP = |true matches| / rank of the last true match (Ye et al. 2021, TPAMI).
All rates are percentages, like top-1 accuracy elsewhere in this package.

Distances are computed for ``chunk_size`` queries at a time, so the Q x G matrix never exists
whole (MSMT17: 11,659 x 82,161 would be 3.8 GB in float32).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .rerank import RerankParams

METRICS = ("cosine", "euclidean", "sqeuclidean")
NO_CAMERA = -1  # camid of an image whose camera is not known

ArrayLike = np.ndarray | torch.Tensor | Sequence[int]


@dataclass(frozen=True)
class RankingResult:
    """Ranking metrics in percent, averaged over the ``num_query`` queries that have a true match."""

    mAP: float
    cmc: np.ndarray  # (max_rank,) float64; cmc[r - 1] = percent of queries matched within rank r
    mINP: float
    num_query: int  # queries in the averages
    num_left_out: int  # queries without a true match in their gallery
    num_gallery: int
    query_ap: np.ndarray  # (Q,) float64, percent; NaN for the queries left out

    def rank(self, r: int) -> float:
        if not 1 <= r <= len(self.cmc):
            raise ValueError(
                f"rank-{r} needs max_rank >= {r}; this result has CMC up to rank {len(self.cmc)}"
            )
        return float(self.cmc[r - 1])

    @property
    def rank1(self) -> float:
        return self.rank(1)

    @property
    def rank5(self) -> float:
        return self.rank(5)

    @property
    def rank10(self) -> float:
        return self.rank(10)

    def summary(self) -> dict[str, float | int]:
        """The scalars to log: mAP, rank-1/5/10 (those within max_rank), mINP and the counts."""
        out: dict[str, float | int] = {"mAP": self.mAP}
        out.update({f"rank{r}": self.rank(r) for r in (1, 5, 10) if r <= len(self.cmc)})
        out.update(mINP=self.mINP, num_query=self.num_query, num_left_out=self.num_left_out)
        out["num_gallery"] = self.num_gallery
        return out


def pairwise_distance(a: torch.Tensor, b: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """(M, N) float32 distances between the rows of ``a`` (M, D) and ``b`` (N, D).

    cosine: 1 - cos(a_i, b_j) (rows L2-normalised here); euclidean: ||a_i - b_j||;
    sqeuclidean: ||a_i - b_j||^2.
    """
    _check_metric(metric)
    return _distance(_prepare(a, metric), _prepare(b, metric), metric)


def evaluate_ranking(
    query_features: torch.Tensor,
    gallery_features: torch.Tensor,
    query_pids: ArrayLike,
    query_camids: ArrayLike,
    gallery_pids: ArrayLike,
    gallery_camids: ArrayLike,
    *,
    metric: str = "cosine",
    chunk_size: int = 256,
    max_rank: int = 10,
    same_file: ArrayLike | None = None,
    rerank: bool | RerankParams = False,
) -> RankingResult:
    """Rank the gallery for every query and average mAP, CMC and mINP (see the module docstring).

    Args:
        query_features: (Q, D) on any device; the distances are computed there in float32.
        gallery_features: (G, D).
        query_pids, query_camids: (Q,) integer identity and camera labels; camid -1 = no camera.
        gallery_pids, gallery_camids: (G,).
        metric: "cosine" (features L2-normalised first), "euclidean" or "sqeuclidean".
        chunk_size: queries whose distances are held at once (chunk_size x G floats, several times).
        max_rank: CMC is reported for ranks 1..max_rank.
        same_file: (Q,) gallery index of each query's own image, -1 where it is not in the gallery
            (``same_file_index`` builds it from paths); those entries are never ranked.
        rerank: True (default parameters) or a ``RerankParams``: rank by k-reciprocal re-ranked
            distances (``rerank.reranked_distances``) computed from the same features, L2-normalised
            first when ``metric`` is "cosine".
    """
    _check_metric(metric)
    if chunk_size < 1 or max_rank < 1:
        raise ValueError(f"chunk_size and max_rank must be >= 1, got {chunk_size} and {max_rank}")
    if query_features.ndim != 2 or gallery_features.ndim != 2:
        raise ValueError("query_features and gallery_features must be (N, D) matrices")
    if query_features.shape[1] != gallery_features.shape[1]:
        raise ValueError(
            f"feature sizes differ: query {query_features.shape[1]}, gallery {gallery_features.shape[1]}"
        )
    device = query_features.device
    num_query, num_gallery = len(query_features), len(gallery_features)
    labels = {
        "query_pids": (query_pids, num_query),
        "query_camids": (query_camids, num_query),
        "gallery_pids": (gallery_pids, num_gallery),
        "gallery_camids": (gallery_camids, num_gallery),
    }
    if same_file is not None:
        labels["same_file"] = (same_file, num_query)
    tensors = {name: _labels(values, size, name, device) for name, (values, size) in labels.items()}
    own = tensors.get("same_file")
    if own is not None and ((own < -1) | (own >= num_gallery)).any():
        raise ValueError(f"same_file holds gallery indices in [-1, {num_gallery}), got values outside")

    query, gallery = query_features, gallery_features.to(device)
    if rerank:
        from .rerank import RerankParams, reranked_distances  # rerank builds on this module

        params = rerank if isinstance(rerank, RerankParams) else RerankParams()
        normalize = metric == "cosine"
        chunks = reranked_distances(query, gallery, params, normalize=normalize, chunk_size=chunk_size)
    else:
        chunks = _plain_chunks(_prepare(query, metric), _prepare(gallery, metric), metric, chunk_size)
    return rank_distance_chunks(
        chunks,
        tensors["query_pids"],
        tensors["query_camids"],
        tensors["gallery_pids"],
        tensors["gallery_camids"],
        max_rank=max_rank,
        same_file=own,
    )


def rank_distance_chunks(
    chunks: Iterable[tuple[int, torch.Tensor]],
    query_pids: torch.Tensor,
    query_camids: torch.Tensor,
    gallery_pids: torch.Tensor,
    gallery_camids: torch.Tensor,
    *,
    max_rank: int = 10,
    same_file: torch.Tensor | None = None,
) -> RankingResult:
    """The metrics from distances given as (first query index, (B, G) distances) chunks.

    The chunks must cover the queries 0..Q-1 in order; labels are int64 tensors on the chunks'
    device (``evaluate_ranking`` prepares them). This is the step shared by plain and re-ranked
    evaluation.
    """
    per_query = []
    expected = 0
    for start, dist in chunks:
        if start != expected:
            raise ValueError(
                f"distance chunks must cover the queries in order: got {start}, expected {expected}"
            )
        end = start + len(dist)
        own = None if same_file is None else same_file[start:end]
        q_pids, q_cams = query_pids[start:end], query_camids[start:end]
        per_query.append(_score_chunk(dist, q_pids, q_cams, gallery_pids, gallery_camids, own))
        expected = end
    if expected != len(query_pids):
        raise ValueError(f"distance chunks covered {expected} queries, expected {len(query_pids)}")
    ap, first, inp, valid = (torch.cat(parts).cpu().numpy() for parts in zip(*per_query, strict=True))
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError("no query has a true match in its gallery: nothing to average")
    ap, inp = ap.astype(np.float64), inp.astype(np.float64)
    hits_within = np.bincount(np.minimum(first[valid], max_rank + 1), minlength=max_rank + 2)
    cmc = np.cumsum(hits_within[1 : max_rank + 1]) / num_valid
    return RankingResult(
        mAP=100.0 * float(ap[valid].mean()),
        cmc=100.0 * cmc,
        mINP=100.0 * float(inp[valid].mean()),
        num_query=num_valid,
        num_left_out=len(valid) - num_valid,
        num_gallery=len(gallery_pids),
        query_ap=np.where(valid, 100.0 * ap, np.nan),
    )


def same_file_index(query_paths: Sequence[str], gallery_paths: Sequence[str]) -> np.ndarray:
    """(Q,) int64: the gallery index of each query's own file, -1 where it is not in the gallery.

    For ``evaluate_ranking(same_file=...)`` when queries are also gallery images (sets without
    camera labels). Gallery paths must be unique.
    """
    position = {path: i for i, path in enumerate(gallery_paths)}
    if len(position) != len(gallery_paths):
        raise ValueError("gallery_paths repeat a file: every gallery image must be listed once")
    return np.array([position.get(path, -1) for path in query_paths], dtype=np.int64)


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def _prepare(features: torch.Tensor, metric: str) -> torch.Tensor:
    features = features.float()
    return F.normalize(features, dim=1) if metric == "cosine" else features


def _distance(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """Distances between rows already passed through ``_prepare``; in-place ops keep one (M, N) buffer."""
    product = a @ b.T  # (M, N)
    if metric == "cosine":
        return product.neg_().add_(1.0)
    a_sq, b_sq = (torch.linalg.vector_norm(x, dim=1).square_() for x in (a, b))  # no (N, D) temporary
    squared = product.mul_(-2.0).add_(a_sq[:, None]).add_(b_sq[None, :])
    squared.clamp_min_(0.0)  # rounding can leave tiny negatives for (near-)identical rows
    return squared if metric == "sqeuclidean" else squared.sqrt_()


def _plain_chunks(
    query: torch.Tensor, gallery: torch.Tensor, metric: str, chunk_size: int
) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, len(query), chunk_size):
        yield start, _distance(query[start : start + chunk_size], gallery, metric)


def _score_chunk(
    dist: torch.Tensor,
    q_pids: torch.Tensor,
    q_cams: torch.Tensor,
    g_pids: torch.Tensor,
    g_cams: torch.Tensor,
    own: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query of the chunk: AP, rank of the first true match, INP, and whether it has a match.

    Removed gallery entries stay in the sorted rows but are skipped by counting ranks only over
    the kept ones, so every query of the chunk is scored with the same (B, G) tensors.
    """
    order = torch.sort(dist, dim=1, stable=True).indices  # (B, G), ties in gallery order
    match = g_pids[order] == q_pids[:, None]
    removed = match & (g_cams[order] == q_cams[:, None]) & (q_cams[:, None] != NO_CAMERA)
    if own is not None:
        removed |= order == own[:, None]  # own == -1 matches nothing
    kept = ~removed
    hit = match & kept
    rank = kept.cumsum(1, dtype=torch.int32)  # 1-based rank among the kept entries
    hits_so_far = hit.cumsum(1, dtype=torch.int32)
    num_hits = hit.sum(1)
    valid = num_hits > 0
    precision = torch.where(hit, hits_so_far / rank.clamp_min(1), 0.0)  # (B, G) float32
    ap = precision.sum(1) / num_hits.clamp_min(1)
    beyond = torch.iinfo(torch.int32).max
    first = torch.where(hit, rank, beyond).amin(1)
    last = torch.where(hit, rank, 0).amax(1)
    inp = num_hits / last.clamp_min(1)
    return ap, first.long(), inp, valid


def _labels(values: ArrayLike, size: int, name: str, device: torch.device) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        out = values.to(device=device, dtype=torch.int64)
    else:
        out = torch.as_tensor(np.asarray(values, dtype=np.int64), device=device)
    if out.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {tuple(out.shape)}")
    return out
