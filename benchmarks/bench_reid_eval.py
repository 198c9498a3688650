"""Time and peak memory of Re-ID ranking at MSMT17's size, chunked over queries.

MSMT17 has 11,659 queries and 82,161 gallery images; the full distance matrix would be 3.8 GB in
float32. ``evaluate_ranking`` computes ``--chunk`` queries' distances at a time; this prints the
wall time, the process's peak RSS (CPU) or the peak CUDA allocation, and what the features
themselves take, on random features with MSMT17's identity and camera counts.

    python benchmarks/bench_reid_eval.py                     # MSMT17 size, D = 768, CPU
    python benchmarks/bench_reid_eval.py --dim 1536 --device cuda
    python benchmarks/bench_reid_eval.py --queries 2000 --gallery 15000   # a quick look
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from dual_cross_attention.retrieval.ranking import evaluate_ranking


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=11_659)
    parser.add_argument("--gallery", type=int, default=82_161)
    parser.add_argument("--ids", type=int, default=3_060, help="test identities (MSMT17: 3,060)")
    parser.add_argument("--cameras", type=int, default=15)
    parser.add_argument("--dim", type=int, default=768, help="768: sa or glca of ViT-B; 1536: sa+glca")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    gallery_pids = rng.integers(0, args.ids, args.gallery)
    query_pids = gallery_pids[rng.integers(0, args.gallery, args.queries)]  # every query has matches
    centres = torch.randn(args.ids, args.dim, generator=torch.Generator().manual_seed(0))
    query = (centres[query_pids] + 2.0 * torch.randn(args.queries, args.dim)).to(device)
    gallery = (centres[gallery_pids] + 2.0 * torch.randn(args.gallery, args.dim)).to(device)
    feature_mb = (query.numel() + gallery.numel()) * 4 / 2**20
    before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = evaluate_ranking(
        query, gallery, query_pids, rng.integers(0, args.cameras, args.queries),
        gallery_pids, rng.integers(0, args.cameras, args.gallery), chunk_size=args.chunk,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    full_mb = args.queries * args.gallery * 4 / 2**20
    print(f"{args.queries} queries x {args.gallery} gallery, D {args.dim}, chunk {args.chunk}, {device}: "
          f"{seconds:.1f} s; mAP {result.mAP:.2f}, rank-1 {result.rank1:.2f} (random features)")  # fmt: skip
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        print(
            f"peak CUDA allocation {peak:.0f} MB (features {feature_mb:.0f} MB; a full matrix: "
            f"{full_mb:.0f} MB)"
        )
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak RSS {peak:.0f} MB, {peak - before_mb:.0f} MB above the features and setup "
              f"({feature_mb:.0f} MB of features; a full matrix alone: {full_mb:.0f} MB)")  # fmt: skip


if __name__ == "__main__":
    main()
