"""Evaluation: generation and option scoring per task, metrics and per-task tables.

``evaluator`` holds the :func:`evaluate` entry point; ``generation`` (greedy decoding), ``options`` (option
log-likelihood scoring) and ``results`` (:class:`EvalResult`, :func:`compare_table`) do the parts.
"""

from .evaluator import evaluate
from .generation import generate_predictions
from .options import score_options
from .results import EvalResult, compare_table

__all__ = ["EvalResult", "compare_table", "evaluate", "generate_predictions", "score_options"]
