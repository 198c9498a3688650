"""Evaluate a Re-ID checkpoint: rank its dataset's gallery for every query, per inference mode,
and optionally save the features the ranking was computed on.

``evaluate_checkpoint`` hands a checkpoint here when its config names a Re-ID dataset.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..builders import build_eval_loader, build_reid_data, normalization
from ..data.reid import ReIDDataset
from ..distributed import DistInfo
from ..errors import UsageError
from ..prediction import TrainedModel
from ..provenance import evaluation_provenance, format_provenance
from ..retrieval.ranking import NO_CAMERA, pairwise_distance, same_file_index
from ..retrieval.rerank import RerankParams, reranked_distances
from ..runtime import autocast
from ..visualize_reid import TOP_K, GalleryMatch, ReIDExample, draw_reid_matches
from .reid import REID_METRICS, ReIDSummary, evaluate_reid
from .report import spread_indices, to_uint8, write_json

_logger = logging.getLogger(__name__)


@dataclass
class ReIDReport:
    summary: ReIDSummary
    results: dict[str, Any]  # the --json document
    out_dir: Path
    files: list[Path]


def reid_results_json(
    summary: ReIDSummary,
    checkpoint: Path,
    dataset: str,
    version: str,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The --json document: ``{mode: {mAP, rank1, rank5, rank10, mINP}}`` plus the counts, protocol
    and (under ``provenance``) the record of ``provenance.evaluation_provenance``."""
    results: dict[str, Any] = {"checkpoint": str(checkpoint), "task": "reid", "dataset": dataset}
    if version:
        results["dataset_version"] = version
    results.update({mode: dict(values) for mode, values in summary.metrics.items()})
    results.update(
        num_query=summary.num_query,
        num_gallery=summary.num_gallery,
        num_query_left_out=summary.num_left_out,
        protocol=summary.protocol,
    )
    if provenance is not None:
        results["provenance"] = provenance
    return results


def save_features(summary: ReIDSummary, query, gallery, path: Path) -> Path:
    """Write exactly the vectors the distances were taken between, with ids, cameras and paths
    (junk already left out); loadable with ``np.load(path, allow_pickle=False)``."""
    arrays: dict[str, np.ndarray] = {}
    for part, dataset in (("query", query), ("gallery", gallery)):
        for mode, features in summary.features[part].items():
            arrays[f"{part}_{mode}"] = features.float().cpu().numpy()
        arrays[f"{part}_pids"] = np.asarray(dataset.pids, dtype=np.int64)
        arrays[f"{part}_camids"] = np.asarray(dataset.camids, dtype=np.int64)
        arrays[f"{part}_paths"] = np.asarray([str(p) for p in dataset.paths], dtype=np.str_)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def query_distances(
    query_features: torch.Tensor,
    gallery_features: torch.Tensor,
    indices: Sequence[int],
    metric: str,
    rerank: bool = False,
) -> torch.Tensor:
    """(n, G) float32 distances of the queries at ``indices`` to every gallery entry, the ones the
    metrics ranked by: ``metric`` on the features, or with ``rerank`` the k-reciprocal re-ranked
    distances, which depend on all queries and so are computed over all of them."""
    if not rerank:
        return pairwise_distance(query_features[list(indices)], gallery_features, metric)
    normalize = metric == "cosine"  # as evaluate_ranking re-ranks
    chunks = reranked_distances(query_features, gallery_features, RerankParams(), normalize=normalize)
    needed, rows = set(indices), {}
    for start, dist in chunks:
        rows.update({i: dist[i - start] for i in range(start, start + len(dist)) if i in needed})
        if len(rows) == len(needed):
            break
    return torch.stack([rows[i] for i in indices])


def top_matches(
    distances: torch.Tensor,
    query_pids: np.ndarray,
    query_camids: np.ndarray,
    gallery_pids: np.ndarray,
    gallery_camids: np.ndarray,
    same_file: np.ndarray | None = None,
    k: int = TOP_K,
) -> list[np.ndarray]:
    """Per query row of ``distances`` (n, G): the gallery indices of its ``k`` nearest entries,
    nearest first with ties in gallery order (as ``ranking`` sorts), after the protocol's
    exclusions: same identity and same camera; for a query without a camera (-1) only its own
    file, ``same_file`` (n,) giving its gallery index (-1: not in the gallery)."""
    order = torch.sort(distances.float().cpu(), dim=1, stable=True).indices.numpy()  # (n, G)
    q_pids, q_cams = np.asarray(query_pids)[:, None], np.asarray(query_camids)[:, None]  # (n, 1)
    g_pids, g_cams = np.asarray(gallery_pids)[order], np.asarray(gallery_camids)[order]  # (n, G)
    removed = (g_pids == q_pids) & (g_cams == q_cams) & (q_cams != NO_CAMERA)
    if same_file is not None:
        removed |= order == np.asarray(same_file)[:, None]
    return [row[~gone][:k] for row, gone in zip(order, removed, strict=True)]


def _gallery_matches(
    gallery: ReIDDataset,
    best: np.ndarray,
    distances: np.ndarray,
    query_pid: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> list[GalleryMatch]:
    """The gallery entries ``best`` as the model saw them, with their distances (G,) to the query."""
    if len(best) == 0:
        return []
    thumbs = to_uint8(torch.stack([gallery[j][0] for j in best]), mean, std)  # (k, H, W, 3)
    return [
        GalleryMatch(thumb, int(gallery.pids[j]), int(gallery.camids[j]), float(distances[j]), bool(correct))
        for thumb, j, correct in zip(thumbs, best, gallery.pids[best] == query_pid, strict=True)
    ]


@torch.no_grad()
def reid_match_examples(
    trained: TrainedModel,
    summary: ReIDSummary,
    query: ReIDDataset,
    gallery: ReIDDataset,
    count: int,
    metric: str,
    rerank: bool = False,
) -> list[ReIDExample]:
    """``count`` queries spread over the query set, each with its top-``TOP_K`` gallery matches by
    the primary mode's embeddings (kept in ``summary.features``) under the metrics' protocol, and
    the rollout and GLCA patches of the query's forward pass."""
    mode = summary.primary_mode
    indices = spread_indices(len(query), count)
    features = summary.features
    distances = query_distances(features["query"][mode], features["gallery"][mode], indices, metric, rerank)
    own = None
    if not (query.camids != NO_CAMERA).any():  # the rule evaluate_reid applies
        own = same_file_index([str(query.paths[i]) for i in indices], [str(p) for p in gallery.paths])
    q_pids, q_cams = query.pids[indices], query.camids[indices]
    ranked = top_matches(distances, q_pids, q_cams, gallery.pids, gallery.camids, own)
    mean, std = normalization(trained.config)
    images = torch.stack([query[i][0] for i in indices]).to(trained.device)  # (n, 3, H, W)
    with autocast(trained.device, trained.amp_dtype):
        out = trained.model(images)
    pixels, distances = to_uint8(images, mean, std), distances.cpu().numpy()
    attention: list[dict[str, np.ndarray]] = [{} for _ in indices]  # none without GLCA
    if out.rollout is not None:
        gh, gw = trained.model.backbone.patch_embed.grid_size
        rollout = out.rollout.float().view(len(indices), gh, gw).cpu().numpy()  # (n, gh, gw)
        selected = out.local_index.cpu().numpy()  # (n, k)
        attention = [{"rollout": r, "selected": s} for r, s in zip(rollout, selected, strict=True)]
    examples = []
    for row, best in enumerate(ranked):
        matches = _gallery_matches(gallery, best, distances[row], int(q_pids[row]), mean, std)
        examples.append(
            ReIDExample(pixels[row], int(q_pids[row]), int(q_cams[row]), matches=matches, **attention[row])
        )
    return examples


def evaluate_reid_trained(
    trained: TrainedModel,
    dist: DistInfo,
    out_dir: Path,
    rerank: bool = False,
    features_path: str | Path | None = None,
    show_progress: bool = False,
    visualize: int = 0,
    tta: str = "none",
) -> ReIDReport:
    """Rank query against gallery of the checkpoint's dataset with the checkpoint's distance.

    Args:
        visualize: draw this many queries with their top-10 gallery matches (0: no picture).
        tta: ``flip``: rank flip-averaged embeddings (``evaluation.reid.image_embeddings``); the
            features saved are those.
    """
    cfg = trained.config
    data = build_reid_data(cfg, split="test")
    if list(data.classes) != list(trained.classes):
        _logger.info("the training identities differ from the checkpoint's (fine for retrieval on new data)")
    if len(data.eval) == 0 or len(data.gallery) == 0:
        raise UsageError(f"{cfg.data.dataset} at {cfg.data.root}: the query or gallery set holds no images")
    query_loader = build_eval_loader(cfg, data.eval, trained.device, dist)
    gallery_loader = build_eval_loader(cfg, data.gallery, trained.device, dist)
    _logger.info("evaluating %s on %s: %d queries, %d gallery images (%s, re-ranking %s, TTA %s)",
                 trained.checkpoint, cfg.data.dataset, len(data.eval), len(data.gallery), trained.device,
                 rerank, tta)  # fmt: skip
    summary = evaluate_reid(
        trained.model, query_loader, gallery_loader, trained.device, trained.modes, trained.amp_dtype,
        cfg.reid.distance, rerank, keep_features=features_path is not None or visualize > 0,
        show_progress=show_progress and dist.is_main, tta=tta,
    )  # fmt: skip
    record = evaluation_provenance(
        trained, protocol=summary.protocol, tta=tta, dataset_version=data.reid.version,
        world_size=dist.world_size,
    )  # fmt: skip
    results = reid_results_json(summary, trained.checkpoint, cfg.data.dataset, data.reid.version, record)
    files: list[Path] = []
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        files.append(write_json(results, out_dir / "reid_metrics.json"))
        if features_path is not None:
            files.append(save_features(summary, data.eval, data.gallery, Path(features_path)))
        if visualize:
            examples = reid_match_examples(
                trained, summary, data.eval, data.gallery, visualize, cfg.reid.distance, rerank
            )
            caption = (
                f"top-{TOP_K} gallery matches by {summary.primary_mode} embeddings (green: same identity, "
                f"red: another); {summary.protocol}"
            )
            files.append(draw_reid_matches(examples, out_dir / "reid_matches.png", caption))
    return ReIDReport(summary, results, out_dir, files)


def format_reid_report(report: ReIDReport) -> str:
    """The table the script prints: mAP, CMC and mINP per mode, counts, protocol, files."""
    r = report.results
    lines = [
        f"{r['checkpoint']}  {r['dataset']}: {r['num_query']} queries ({r['num_query_left_out']} without a "
        f"true match left out), {r['num_gallery']} gallery images",
        *format_provenance(r["provenance"]),
        f"{'mode':<8} " + " ".join(f"{key:>7}" for key in REID_METRICS),
    ]
    for mode, values in report.summary.metrics.items():
        lines.append(f"{mode:<8} " + " ".join(f"{values[key]:7.2f}" for key in REID_METRICS))
    lines.append(f"wrote {', '.join(str(p) for p in report.files)}")
    return "\n".join(lines)
