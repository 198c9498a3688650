"""Object re-identification: ranking metrics (``ranking``), k-reciprocal re-ranking (``rerank``),
batch-hard triplet loss in one process or over all (``triplet``), and gathering shards of
different sizes from every process (``gather``)."""

from .gather import gather_list, gather_variable, gather_variable_with_sizes
from .ranking import RankingResult, evaluate_ranking, pairwise_distance, rank_distance_chunks, same_file_index
from .rerank import RerankParams, reranked_distance_matrix, reranked_distances
from .triplet import batch_hard_triplet_loss, global_batch_hard_triplet_loss

__all__ = [
    "RankingResult",
    "RerankParams",
    "batch_hard_triplet_loss",
    "evaluate_ranking",
    "gather_list",
    "gather_variable",
    "gather_variable_with_sizes",
    "global_batch_hard_triplet_loss",
    "pairwise_distance",
    "rank_distance_chunks",
    "reranked_distance_matrix",
    "reranked_distances",
    "same_file_index",
]
