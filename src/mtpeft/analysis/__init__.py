"""Multi-task diagnostics: gradient conflict, spectral alignment, layer similarity, subspace overlap, routers,
adapter-space task alignment.

Python API::

    from mtpeft.analysis import analyze_run, analyze_model
    analyze_run("runs/bbh27-thanora")            # writes runs/bbh27-thanora/analysis/ (Markdown, JSON, PNG)
    diags = analyze_model(model, batches)        # batches: {task: [collated batch, ...]}

Each diagnostic is a :class:`Diagnostic` (a table, JSON data and a plot); the building blocks
(:func:`gradient_conflict`, :func:`spectral_alignment`, :func:`layer_similarity`, :func:`subspace_overlap`,
:func:`routing_stats`, :func:`task_mmd`...) work on plain tensors too. Command line: ``mtpeft analyze RUN_DIR``.
"""

from ..runs import load_run
from .alignment import (
    AdapterFeatures,
    adapter_alignment,
    alignment_stats,
    collect_adapter_features,
    mean_distance_ratio,
    task_mmd,
)
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
    "AdapterFeatures",
    "Diagnostic",
    "TaskGradients",
    "adapter_alignment",
    "alignment_numbers",
    "alignment_stats",
    "analyze_model",
    "analyze_run",
    "check_diagnostics",
    "collect_adapter_features",
    "collect_routing",
    "collect_task_gradients",
    "cosine",
    "cosine_matrix",
    "gradient_conflict",
    "layer_similarity",
    "load_run",
    "mean_distance_ratio",
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
    "task_mmd",
    "task_mean_hidden_states",
    "task_subspace_overlap",
    "thanora_blocks",
    "top_right_singular",
    "write_analysis",
]
