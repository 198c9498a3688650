"""Re-ID evaluation: retrieval embeddings of query and gallery, ranked per inference mode.

The embedding of each mode (the paper's rule for ``sa+glca``): the SA and GLCA final class
tokens after the BNNeck's norm (when the model has one), ``sa+glca`` their concatenation with each
half L2-normalised first, so the two count equally under the cosine distance. With flip TTA
(``eval.tta`` / ``--tta flip``) each branch's feature is averaged over the image and its mirror
before ``sa+glca`` is built. These are exactly the vectors the distance is taken between, and
what ``--save-features`` writes.

Under torchrun each process embeds its shard (``ShardSampler``: every world_size-th image); the
shards are gathered, with their unequal sizes, and put back in dataset order before ranking.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..inference import flip_averaged
from ..models.dual_vit import DualViTOutput, neck_features
from ..retrieval.gather import gather_variable
from ..retrieval.ranking import NO_CAMERA, evaluate_ranking, same_file_index

REID_METRICS = ("mAP", "rank1", "rank5", "rank10", "mINP")


def branch_embeddings(model: nn.Module, out: DualViTOutput) -> dict[str, torch.Tensor]:
    """Each branch's retrieval feature (B, C) float32 from one forward: ``sa`` and, with GLCA, ``glca``."""
    parts = {"sa": neck_features(model.backbone.head, out.sa_features).float()}
    if out.glca_features is not None:
        parts["glca"] = neck_features(model.glca_head, out.glca_features).float()
    return parts


def mode_embeddings(parts: dict[str, torch.Tensor], modes: Sequence[str]) -> dict[str, torch.Tensor]:
    """The embedding (B, D) of each mode from the branch features: ``sa+glca`` is the two halves,
    each L2-normalised, concatenated."""
    result = {}
    for mode in modes:
        if mode == "sa+glca":
            result[mode] = torch.cat(
                [F.normalize(parts["sa"], dim=1), F.normalize(parts["glca"], dim=1)], dim=1
            )
        else:
            result[mode] = parts[mode]
    return result


def embeddings(model: nn.Module, out: DualViTOutput, modes: Sequence[str]) -> dict[str, torch.Tensor]:
    """The retrieval embedding (B, D) float32 of each mode from one forward's outputs."""
    return mode_embeddings(branch_embeddings(model, out), modes)


def image_embeddings(
    model: nn.Module,
    images: torch.Tensor,
    modes: Sequence[str],
    tta: str = "none",
    amp_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """The retrieval embedding (B, D) of each mode of ``images`` (B, 3, H, W).

    With ``tta='flip'`` each branch's feature is averaged over the image and its mirror (as Re-ID
    papers report it) and the modes are built from the averages, so ``sa+glca`` is still two unit
    halves, the flip-averaged ``sa`` and ``glca`` embeddings normalised.
    """
    parts, _ = flip_averaged(model, images, lambda out: branch_embeddings(model, out), tta, amp_dtype)
    return mode_embeddings(parts, modes)


@torch.no_grad()
def extract_embeddings(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    modes: Sequence[str],
    amp_dtype: torch.dtype = torch.float32,
    show_progress: bool = False,
    desc: str = "embed",
    tta: str = "none",
) -> dict[str, torch.Tensor]:
    """Embeddings (N, D) of every image of ``loader``'s dataset, in dataset order, on ``device``;
    under torchrun gathered from all processes' shards. ``tta``: see ``image_embeddings``."""
    model.eval()
    chunks: dict[str, list[torch.Tensor]] = {m: [] for m in modes}
    for images, _ in tqdm(loader, desc=desc, disable=not show_progress, leave=False):
        for mode, value in image_embeddings(
            model, images.to(device, non_blocking=True), modes, tta, amp_dtype
        ).items():
            chunks[mode].append(value)
    sampler_indices = torch.as_tensor(list(iter(loader.sampler)), dtype=torch.long, device=device)
    order = gather_variable(sampler_indices)  # the dataset index of each gathered row
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=device)
    result = {}
    for mode, parts in chunks.items():
        local = torch.cat(parts) if parts else torch.empty(0, 0, device=device)
        result[mode] = gather_variable(local)[inverse]
    return result


@dataclass
class ReIDSummary:
    """Ranking metrics per mode (percent), like ``metrics.Summary`` for FGVC."""

    metrics: dict[str, dict[str, float]]  # mode -> mAP/rank1/rank5/rank10/mINP
    num_query: int  # queries in the averages (those with a true match in their gallery)
    num_gallery: int
    num_left_out: int = 0  # queries without any true match, left out of the averages
    protocol: str = ""
    features: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)  # query/gallery

    @property
    def primary_mode(self) -> str:
        return "sa+glca" if "sa+glca" in self.metrics else "sa"

    @property
    def num_images(self) -> int:
        return self.num_query + self.num_gallery


def protocol_text(has_cameras: bool, metric: str, rerank: bool) -> str:
    """The evaluation protocol in words, for reports."""
    removed = (
        "same-identity-same-camera gallery images removed per query"
        if has_cameras
        else "no cameras: only the query image itself removed from its gallery"
    )
    return f"{removed}; junk left out; {metric} distance; " + (
        "k-reciprocal re-ranking" if rerank else "no re-ranking"
    )


def reid_protocol(query, metric: str, rerank: bool) -> str:
    """``protocol_text`` for a query set (a ``ReIDDataset``): with cameras unless all camids are -1."""
    return protocol_text(bool((np.asarray(query.camids) != NO_CAMERA).any()), metric, rerank)


@torch.no_grad()
def evaluate_reid(
    model: nn.Module,
    query_loader: Iterable,
    gallery_loader: Iterable,
    device: torch.device,
    modes: Sequence[str],
    amp_dtype: torch.dtype = torch.float32,
    metric: str = "cosine",
    rerank: bool = False,
    keep_features: bool = False,
    show_progress: bool = False,
    tta: str = "none",
) -> ReIDSummary:
    """mAP, CMC rank-1/5/10 and mINP of each mode, ranking the gallery for every query
    (``tta='flip'``: on flip-averaged embeddings, ``image_embeddings``).

    The loaders' datasets are ``ReIDDataset``s (their ``pids``, ``camids`` and ``paths``). Without
    cameras (all camids -1) a query's own file is the only gallery entry removed.
    """
    query, gallery = query_loader.dataset, gallery_loader.dataset
    q = extract_embeddings(model, query_loader, device, modes, amp_dtype, show_progress, "embed query", tta)
    g = extract_embeddings(
        model, gallery_loader, device, modes, amp_dtype, show_progress, "embed gallery", tta
    )
    has_cameras = bool((np.asarray(query.camids) != NO_CAMERA).any())
    same_file = (
        None
        if has_cameras
        else same_file_index([str(p) for p in query.paths], [str(p) for p in gallery.paths])
    )
    metrics, result = {}, None
    for mode in modes:
        result = evaluate_ranking(
            q[mode], g[mode], query.pids, query.camids, gallery.pids, gallery.camids,
            metric=metric, same_file=same_file, rerank=rerank,
        )  # fmt: skip
        metrics[mode] = {key: float(value) for key, value in result.summary().items() if key in REID_METRICS}
    features = {"query": q, "gallery": g} if keep_features else {}
    return ReIDSummary(
        metrics=metrics,
        num_query=result.num_query,
        num_gallery=result.num_gallery,
        num_left_out=result.num_left_out,
        protocol=reid_protocol(query, metric, rerank),
        features=features,
    )
