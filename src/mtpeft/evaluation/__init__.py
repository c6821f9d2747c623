"""Evaluation: generation and option scoring per task, metrics and per-task tables."""

from .evaluator import EvalResult, compare_table, evaluate

__all__ = ["EvalResult", "compare_table", "evaluate"]
