"""Ablations: named variants x seeds as ordinary training runs, and one table over them."""

from .report import AblationReport
from .runner import ablation_name, run_ablation
from .variants import BASELINE, BUILTIN_VARIANTS, known_variants, select_variants

__all__ = [
    "BASELINE",
    "BUILTIN_VARIANTS",
    "AblationReport",
    "ablation_name",
    "known_variants",
    "run_ablation",
    "select_variants",
]
