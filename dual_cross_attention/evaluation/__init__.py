"""Evaluation: the one tally of predictions (``metrics``), what an evaluation writes (``report``),
inference speed (``throughput``) and evaluating a checkpoint end to end (``checkpoint_eval``)."""

from .checkpoint_eval import ClassMismatchError, EvaluationReport, evaluate_checkpoint, format_report
from .metrics import Summary, Tally, mode_metrics, require_each_image_once, summarize
from .report import most_confused, results_json, write_json, write_tables
from .throughput import Throughput, measure_throughput

__all__ = [
    "ClassMismatchError",
    "EvaluationReport",
    "Summary",
    "Tally",
    "Throughput",
    "evaluate_checkpoint",
    "format_report",
    "measure_throughput",
    "mode_metrics",
    "most_confused",
    "require_each_image_once",
    "results_json",
    "summarize",
    "write_json",
    "write_tables",
]
