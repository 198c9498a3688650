"""Pair verification: are two images the same identity? Metrics on scored pairs (``metrics``), pair
lists on disk and drawn from identities (``pairs``), and their pictures (``pictures``)."""

from .metrics import (
    DEFAULT_FAR_TARGETS,
    TarAtFar,
    VerificationResult,
    accuracy_at,
    check_pairs,
    choose_threshold,
    far_key,
    negatives_needed,
    verification_metrics,
)
from .pairs import (
    Pair,
    PairFileError,
    generate_pairs,
    read_identities,
    read_identity_pairs,
    read_pair_list,
    read_pairs,
    write_pairs,
)
from .pictures import make_roc_figure, make_score_histogram, roc_figure, score_histogram

__all__ = [
    "DEFAULT_FAR_TARGETS",
    "Pair",
    "PairFileError",
    "TarAtFar",
    "VerificationResult",
    "accuracy_at",
    "check_pairs",
    "choose_threshold",
    "far_key",
    "generate_pairs",
    "make_roc_figure",
    "make_score_histogram",
    "negatives_needed",
    "read_identities",
    "read_identity_pairs",
    "read_pair_list",
    "read_pairs",
    "roc_figure",
    "score_histogram",
    "verification_metrics",
    "write_pairs",
]
