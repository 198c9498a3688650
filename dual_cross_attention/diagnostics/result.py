"""The structured result of one check: what ``test_fixes.py`` prints and what tests assert."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CheckResult:
    """One line of the report.

    ``passed`` is None when the check does not apply on this machine or run (a CUDA-only check on
    a CPU, a step skipped by ``--quick``); ``measured`` then says why, so a skip is never silent.
    """

    name: str
    passed: bool | None
    measured: str
    expected: str

    @property
    def status(self) -> str:
        if self.passed is None:
            return "SKIP"
        return "PASS" if self.passed else "FAIL"


def skipped(name: str, reason: str, expected: str) -> CheckResult:
    return CheckResult(name=name, passed=None, measured=f"skipped: {reason}", expected=expected)


def format_result(result: CheckResult) -> str:
    """``PASS  lr.sqrt_rule  measured: ...  expected: ...`` (one line per check)."""
    return f"{result.status}  {result.name:<30} measured: {result.measured}  |  expected: {result.expected}"


def fmt_ratio(value: float) -> str:
    return f"{value:.3f}x"
