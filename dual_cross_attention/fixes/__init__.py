"""Checks that the known failure modes of the implementation this project replaces are fixed.

``python test_fixes.py`` runs them all and prints one line per check; each check is a function
here, so the test suite runs the same code on tiny models. The five groups, one module each:
``lr`` (LR rule, warmup, cosine), ``memory`` (cost against the plain ViT, no growth across steps,
checkpointing, CUDA peak), ``learning`` (a short demo training), ``weighting`` (uncertainty
weights move apart) and ``branches`` (GLCA and PWCA work as the paper says).
"""

from .learning import LearningSpec
from .result import CheckResult, format_result
from .suite import run_checks

__all__ = ["CheckResult", "LearningSpec", "format_result", "run_checks"]
