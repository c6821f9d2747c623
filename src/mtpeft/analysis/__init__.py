"""Multi-task diagnostics: gradient conflict, spectral alignment, layer similarity, subspace overlap, routers.

Python API::

    from mtpeft.analysis import analyze_run, analyze_model
    analyze_run("runs/bbh27-thanora")            # writes runs/bbh27-thanora/analysis/ (Markdown, JSON, PNG)
    diags = analyze_model(model, batches)        # batches: {task: [collated batch, ...]}

Each diagnostic is a :class:`Diagnostic` (a table, JSON data and a plot); the building blocks
(:func:`gradient_conflict`, :func:`spectral_alignment`, :func:`layer_similarity`, :func:`subspace_overlap`,
:func:`routing_stats`...) work on plain tensors too. Command line: ``mtpeft analyze RUN_DIR``.
"""

from ..runs import load_run
from .api import DIAGNOSTICS, analyze_model, analyze_run, check_diagnostics, write_analysis
from .common import Diagnostic, task_batches
from .gradients import TaskGradients, collect_task_gradients, cosine, gradient_conflict
from .routers import (
    collect_routing,
    mean_routing_stats,
    router_diagnostic,
    router_usage,
    routing_stats,
    task_gate_usage,
)
from .similarity import cosine_matrix, layer_similarity, task_mean_hidden_states
from .spectral import alignment_numbers, spectral_alignment, task_matrices
from .subspace import (
    principal_angles,
    subspace_overlap,
    task_subspace_overlap,
    thanora_blocks,
    top_right_singular,
)

__all__ = [
    "DIAGNOSTICS",
    "Diagnostic",
    "TaskGradients",
    "alignment_numbers",
    "analyze_model",
    "analyze_run",
    "check_diagnostics",
    "collect_routing",
    "collect_task_gradients",
    "cosine",
    "cosine_matrix",
    "gradient_conflict",
    "layer_similarity",
    "load_run",
    "mean_routing_stats",
    "principal_angles",
    "router_diagnostic",
    "router_usage",
    "routing_stats",
    "spectral_alignment",
    "subspace_overlap",
    "task_batches",
    "task_gate_usage",
    "task_matrices",
    "task_mean_hidden_states",
    "task_subspace_overlap",
    "thanora_blocks",
    "top_right_singular",
    "write_analysis",
]
