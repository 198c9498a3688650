"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), without any (Q+G) x (Q+G) matrix.

All N = Q + G images (queries first) are encoded together, as in the paper:

1. Original distance: d(i, j) = ||x_i - x_j||^2 (squared euclidean on the features, L2-normalised
   first when ``normalize``), divided by its row maximum: d'(i, j) = d(i, j) / max_k d(i, k), the
   maximum over all N images. (The authors' code divides each column by its maximum and
   transposes; d is symmetric, so that is this row normalisation.) Neighbours are ranked by d'
   as a stable sort would (ties in index order); an image is its own first neighbour.
2. R(i, k): the k-reciprocal neighbours of i, those j among the k + 1 nearest of i that have i among
   their k + 1 nearest.
3. R*(i): R(i, k1) united with R(c, round(k1 / 2)) for every c in R(i, k1) whose set shares more
   than 2/3 of its members with R(i, k1) (strictly more, as in the authors' code; the paper
   writes >=).
4. V(i, j) = exp(-d'(i, j)) for j in R*(i), 0 elsewhere, each row scaled to sum 1. V is sparse:
   a row has at most (k1 + 1) * (round(k1 / 2) + 2) entries, in practice a few dozen.
5. Local query expansion (k2 > 1): V(i) <- the mean of V(j) over the k2 nearest j of i (i first).
6. Jaccard distance d_J(i, j) = 1 - sum_k min(V(i,k), V(j,k)) / sum_k max(V(i,k), V(j,k)),
   with sum max = 2 - sum min since rows sum to 1; computed per query chunk from the nonzeros of
   the query rows and an index of the gallery rows by column.
7. Final distance (query i, gallery j): (1 - lambda) * d_J(i, j) + lambda * d'(i, j).

Distances are computed ``chunk_size`` rows at a time (the neighbour pass twice, so that no
neighbour distances are stored); V is kept as float32 (the authors' code used float16).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .ranking import pairwise_distance


@dataclass(frozen=True)
class RerankParams:
    """k1: size of the k-reciprocal sets; k2: neighbours averaged in query expansion (1: none);
    lambda_value: weight of the original distance in the final one."""

    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3


@dataclass(frozen=True)
class _Encoding:
    """V after query expansion, as CSR rows and, for the gallery rows only, CSC columns."""

    row_ptr: torch.Tensor  # (N + 1,) int64
    row_cols: torch.Tensor  # (nnz,) int64, ascending within a row
    row_vals: torch.Tensor  # (nnz,) float32
    col_ptr: torch.Tensor  # (N + 1,) int64, over the entries of gallery rows
    col_rows: torch.Tensor  # (gallery nnz,) int64, gallery index (row - Q) of each entry
    col_vals: torch.Tensor  # (gallery nnz,) float32
    row_max: torch.Tensor  # (N,) float32, the maximum of each row of d


def reranked_distances(
    query_features: torch.Tensor,
    gallery_features: torch.Tensor,
    params: RerankParams = RerankParams(),  # noqa: B008 - frozen, so a shared default is safe
    *,
    normalize: bool = False,
    chunk_size: int = 256,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Re-ranked query-gallery distances as (first query index, (B, G) float32) chunks, in order.

    The encoding of all images is computed before this returns (on the features' device); the
    chunks are computed as they are consumed.

    Args:
        query_features: (Q, D).
        gallery_features: (G, D), on the same device.
        params: k1, k2 and lambda (paper defaults 20, 6, 0.3).
        normalize: L2-normalise the features first (do so when they are compared by cosine).
        chunk_size: rows of distances (chunk_size x (Q + G) floats) held at once.
    """
    features = torch.cat([query_features, gallery_features]).float()  # (N, D), queries first
    num_query, num = len(query_features), len(features)
    k1, k2, lam = params.k1, params.k2, params.lambda_value
    if k1 < 1 or k2 < 1 or not 0.0 <= lam <= 1.0:
        raise ValueError(f"re-ranking needs k1 >= 1, k2 >= 1 and 0 <= lambda <= 1, got {params}")
    if num < max(k1 + 1, k2):
        raise ValueError(
            f"re-ranking with k1={k1}, k2={k2} needs at least {max(k1 + 1, k2)} images, got {num}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if normalize:
        features = F.normalize(features, dim=1)
    encoding = _encode(features, num_query, k1, k2, chunk_size)
    return _final_chunks(features, num_query, encoding, lam, chunk_size)


def reranked_distance_matrix(
    query_features: torch.Tensor,
    gallery_features: torch.Tensor,
    params: RerankParams = RerankParams(),  # noqa: B008
    *,
    normalize: bool = False,
    chunk_size: int = 256,
) -> torch.Tensor:
    """The whole (Q, G) re-ranked distance matrix; for sets small enough to hold it."""
    chunks = reranked_distances(
        query_features, gallery_features, params, normalize=normalize, chunk_size=chunk_size
    )
    return torch.cat([dist for _, dist in chunks])


def _row_distances(
    features: torch.Tensor, start: int, end: int, row_max: torch.Tensor | None
) -> torch.Tensor:
    """d (or d' when ``row_max`` is given) for rows start..end against all N images: (B, N)."""
    dist = pairwise_distance(features[start:end], features, "sqeuclidean")
    if row_max is not None:
        dist /= row_max[start:end, None]
    return dist


def _encode(features: torch.Tensor, num_query: int, k1: int, k2: int, chunk_size: int) -> _Encoding:
    num = len(features)
    half = round(k1 / 2)  # Python and numpy both round half to even, as the authors' code did
    width = max(k1 + 1, k2)
    neighbours = torch.empty(num, width, dtype=torch.int64, device=features.device)
    row_max = torch.empty(num, device=features.device)
    for start in range(0, num, chunk_size):
        dist = _row_distances(features, start, start + chunk_size, None)
        peak = dist.amax(1).clamp_min(torch.finfo(torch.float32).tiny)  # all-equal rows: avoid 0 / 0
        row_max[start : start + len(dist)] = peak
        neighbours[start : start + len(dist)] = _stable_smallest(dist / peak[:, None], width)

    near, near_half = neighbours[:, : k1 + 1], neighbours[:, : half + 1]
    reciprocal = _reciprocal(near, chunk_size)  # (N, k1 + 1): near[i, m] is in R(i, k1)
    reciprocal_half = _reciprocal(near_half, chunk_size)  # (N, half + 1)

    rows, cols, vals = [], [], []
    for start in range(0, num, chunk_size):
        end = min(start + chunk_size, num)
        members, kept = _expanded_set(near[start:end], reciprocal[start:end], near_half, reciprocal_half, num)
        weight = torch.exp(
            -_row_distances(features, start, end, row_max).gather(1, members.clamp_max(num - 1))
        )
        weight = torch.where(kept, weight, 0.0)
        weight /= weight.sum(1, keepdim=True)
        row_index = torch.arange(start, end, device=features.device)[:, None].expand_as(members)
        rows.append(row_index[kept])
        cols.append(members[kept])
        vals.append(weight[kept])
    row_of, col_of, values = torch.cat(rows), torch.cat(cols), torch.cat(vals)  # row-major, like CSR
    if k2 > 1:
        row_of, col_of, values = _expand_queries(row_of, col_of, values, neighbours[:, :k2], chunk_size)
    in_gallery = row_of >= num_query
    gallery_cols = col_of[in_gallery]
    by_col = torch.sort(gallery_cols, stable=True).indices
    return _Encoding(
        row_ptr=_pointers(row_of, num),
        row_cols=col_of,
        row_vals=values,
        col_ptr=_pointers(gallery_cols, num),
        col_rows=(row_of[in_gallery] - num_query)[by_col],
        col_vals=values[in_gallery][by_col],
        row_max=row_max,
    )


def _stable_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) indices of the k smallest of each row, ascending, ties in index order: the first k of
    a stable sort, without sorting whole rows."""
    kth = values.topk(k, dim=1, largest=False).values[:, -1:]  # (B, 1)
    below, tied = values < kth, values == kth
    room = k - below.sum(1, keepdim=True)  # how many of the values equal to the k-th make the cut
    chosen = below | tied
    crowded = (tied.sum(1, keepdim=True) > room).squeeze(1).nonzero().squeeze(1)  # rare: rows with ties
    if len(crowded):
        first_tied = tied[crowded] & (tied[crowded].cumsum(1) <= room[crowded])  # ties by index
        chosen[crowded] = below[crowded] | first_tied
    index = chosen.nonzero()[:, 1].view(len(values), k)  # exactly k per row, ascending index
    return index.gather(1, torch.sort(values.gather(1, index), dim=1, stable=True).indices)


def _expand_queries(
    row_of: torch.Tensor, col_of: torch.Tensor, values: torch.Tensor, nearest: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local query expansion: row i of the result is the mean of the rows nearest[i] (N, k2) of V.

    V comes and goes as row-major (row, column, value) entries, columns ascending within a row.
    """
    num, k2 = nearest.shape
    row_ptr = _pointers(row_of, num)
    rows, cols, vals = [], [], []
    for start in range(0, num, chunk_size):
        block = nearest[start : start + chunk_size].reshape(-1)  # (B * k2,) rows of V to average
        owner, position = _expand_ranges(row_ptr[block], row_ptr[block + 1] - row_ptr[block])
        key = (start + owner // k2) * num + col_of[position]  # (row, column) as one sortable number
        unique, slot = torch.unique(key, sorted=True, return_inverse=True)
        summed = torch.zeros(len(unique), device=values.device).index_add_(0, slot, values[position])
        rows.append(unique // num)
        cols.append(unique % num)
        vals.append(summed / k2)
    return torch.cat(rows), torch.cat(cols), torch.cat(vals)


def _reciprocal(near: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(N, k + 1) bool: whether image near[i, m] has i among its own k + 1 nearest."""
    out = torch.empty(near.shape, dtype=torch.bool, device=near.device)
    for start in range(0, len(near), chunk_size):
        block = near[start : start + chunk_size]  # (B, k + 1)
        rows = torch.arange(start, start + len(block), device=near.device)
        out[start : start + len(block)] = (near[block] == rows[:, None, None]).any(-1)
    return out


def _expanded_set(
    near: torch.Tensor,
    reciprocal: torch.Tensor,
    near_half: torch.Tensor,
    reciprocal_half: torch.Tensor,
    num: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """R*(i) for a chunk of rows, as (B, L) ascending indices and a mask of the distinct members."""
    cand = near_half[near]  # (B, k1 + 1, h + 1): R(c, h) candidates of every c among i's k1 + 1 nearest
    cand_kept = reciprocal_half[near]  # (B, k1 + 1, h + 1)
    shared = (cand[..., None] == near[:, None, None, :]) & reciprocal[:, None, None, :]
    shared = shared.any(-1) & cand_kept  # member of R(c, h) that is also in R(i, k1)
    accept = reciprocal & (3 * shared.sum(-1) > 2 * cand_kept.sum(-1))  # (B, k1 + 1); exact 2/3
    members = torch.cat([near, cand.flatten(1)], dim=1)
    kept = torch.cat([reciprocal, (cand_kept & accept[..., None]).flatten(1)], dim=1)
    members = torch.sort(torch.where(kept, members, num), dim=1).values  # dropped ones last, as num
    repeat = torch.zeros_like(kept)
    repeat[:, 1:] = members[:, 1:] == members[:, :-1]
    return members, (members < num) & ~repeat


def _final_chunks(
    features: torch.Tensor, num_query: int, enc: _Encoding, lam: float, chunk_size: int
) -> Iterator[tuple[int, torch.Tensor]]:
    num_gallery = len(features) - num_query
    for start in range(0, num_query, chunk_size):
        end = min(start + chunk_size, num_query)
        # Nonzeros of the chunk's query rows, each joined with the gallery rows of its column.
        first, last = enc.row_ptr[start], enc.row_ptr[end]
        counts = enc.row_ptr[start + 1 : end + 1] - enc.row_ptr[start:end]
        q_row = torch.arange(end - start, device=features.device).repeat_interleave(counts)
        q_col, q_val = enc.row_cols[first:last], enc.row_vals[first:last]
        owner, position = _expand_ranges(enc.col_ptr[q_col], enc.col_ptr[q_col + 1] - enc.col_ptr[q_col])
        overlap = torch.minimum(q_val[owner], enc.col_vals[position])
        target = q_row[owner] * num_gallery + enc.col_rows[position]
        sum_min = torch.zeros((end - start) * num_gallery, device=features.device)
        sum_min = sum_min.index_add_(0, target, overlap).view(end - start, num_gallery)
        jaccard = 1.0 - sum_min / (2.0 - sum_min)
        original = pairwise_distance(features[start:end], features[num_query:], "sqeuclidean")
        original /= enc.row_max[start:end, None]
        yield start, (1.0 - lam) * jaccard + lam * original


def _expand_ranges(starts: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ranges [starts[n], starts[n] + counts[n]): each element's range n and its position."""
    owner = torch.arange(len(counts), device=counts.device).repeat_interleave(counts)
    offset = torch.arange(len(owner), device=counts.device) - (counts.cumsum(0) - counts)[owner]
    return owner, starts[owner] + offset


def _pointers(index: torch.Tensor, size: int) -> torch.Tensor:
    """CSR-style pointers for entries sorted by ``index``: entries of n lie in [ptr[n], ptr[n + 1])."""
    ptr = torch.zeros(size + 1, dtype=torch.int64, device=index.device)
    ptr[1:] = torch.bincount(index, minlength=size).cumsum(0)
    return ptr
