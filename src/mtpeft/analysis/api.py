"""Run every diagnostic on a model (:func:`analyze_model`) or a finished run folder (:func:`analyze_run`)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..runs import load_run
from .alignment import adapter_alignment
from .common import BatchesByTask, Diagnostic, task_batches
from .gradients import collect_task_gradients, gradient_conflict
from .routers import router_diagnostic
from .similarity import layer_similarity, task_mean_hidden_states
from .spectral import matrix_layers, matrix_source, spectral_alignment, task_matrices
from .subspace import task_subspace_overlap

#: The diagnostics, in report order.
DIAGNOSTICS: tuple[str, ...] = (
    "gradient_conflict",
    "spectral_alignment",
    "layer_similarity",
    "subspace_overlap",
    "router_usage",
    "alignment",
)


def check_diagnostics(names: Sequence[str] | str | None) -> list[str]:
    """Validate diagnostic names (None = all); unknown ones raise listing the allowed ones."""
    if names is None:
        return list(DIAGNOSTICS)
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in DIAGNOSTICS]
    if unknown or not names:
        raise ValueError(f"unknown diagnostic(s) {unknown or names}; allowed: {list(DIAGNOSTICS)}")
    return [n for n in DIAGNOSTICS if n in names]


def analyze_model(
    model: nn.Module,
    batches: BatchesByTask,
    *,
    diagnostics: Sequence[str] | None = None,
    top_k: int = 4,
    max_layers: int | None = 8,
) -> list[Diagnostic]:
    """Compute the diagnostics of an MTModel from a few collated batches per task (``{task: [batch, ...]}``,
    batches with input_ids, attention_mask, labels and task_ids).

    ``top_k``: the singular directions / subspace dimension of the spectral and subspace diagnostics;
    ``max_layers``: at most this many layers (evenly spread) get d_out x d_in task matrices (memory).
    """
    wanted = check_diagnostics(diagnostics)
    tasks = [t for t in model.adapter_config.tasks if t in batches] or list(batches)
    batches = {t: batches[t] for t in tasks}
    out: list[Diagnostic] = []
    grads = None
    mat_layers = matrix_layers(model, max_layers)
    if {"gradient_conflict", "spectral_alignment", "subspace_overlap"} & set(wanted):
        base_layers = [n for n in mat_layers if matrix_source(model, model.adapter_layers[n]) == "base_gradient"]
        grads = collect_task_gradients(model, batches, base_layers=base_layers)
    matrices, sources = None, None
    if {"spectral_alignment", "subspace_overlap"} & set(wanted):
        all_tasks = list(model.adapter_config.tasks)
        matrices, sources = task_matrices(model, mat_layers, grads, all_tasks)
        matrices = {t: matrices[t] for t in tasks}
    for name in wanted:
        if name == "gradient_conflict":
            out.append(gradient_conflict(grads.flat()))
        elif name == "spectral_alignment":
            out.append(spectral_alignment(matrices, top_k, sources))
        elif name == "layer_similarity":
            out.append(layer_similarity(task_mean_hidden_states(model, batches)))
        elif name == "subspace_overlap":
            out.append(task_subspace_overlap(model, matrices, top_k, sources))
        elif name == "router_usage":
            out.append(router_diagnostic(model, batches))
        elif name == "alignment":
            out.append(adapter_alignment(model, batches))
    return out


def write_analysis(diagnostics: Sequence[Diagnostic], out_dir: str | os.PathLike, header: str = "") -> dict[str, Any]:
    """Write each diagnostic (``.md``, ``.json``, ``.png``) plus ``report.md`` and ``summary.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {d.name: d.save(out) for d in diagnostics}
    parts = ["# Multi-task diagnostics", ""]
    if header:
        parts += [header, ""]
    for d in diagnostics:
        parts += [d.markdown(), f"![{d.title}]({d.name}.png)", ""]
    (out / "report.md").write_text("\n".join(parts), encoding="utf-8")
    summary = {d.name: {"applicable": d.applicable, "note": d.note, "files": files[d.name]} for d in diagnostics}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return {"report": str(out / "report.md"), "summary": str(out / "summary.json"), "files": files}


def analyze_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    diagnostics: Sequence[str] | None = None,
    num_batches: int = 2,
    batch_size: int = 8,
    top_k: int = 4,
    max_layers: int | None = 8,
    split: str = "train",
    device: str | None = None,
    max_tasks: int | None = None,
) -> dict[str, Any]:
    """Load a finished run, compute the diagnostics on ``num_batches`` batches per task (of its ``split``
    examples) and write them to ``out_dir`` (default ``RUN_DIR/analysis``). Returns the written paths and the
    diagnostics."""
    import torch

    from ..data.resolve import resolve_task_specs
    from ..data.tasks import load_tasks

    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    wanted = check_diagnostics(diagnostics)
    cfg, tokenizer, model = load_run(run_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    specs = resolve_task_specs(cfg)
    if max_tasks is not None:
        specs = specs[:max_tasks]
    loaded = load_tasks(specs, cfg.data.root)
    pairs = [(spec, data.train if split == "train" else data.eval) for spec, data in zip(specs, loaded)]
    batches = task_batches(
        tokenizer,
        pairs,
        model.tasks,
        batch_size=batch_size,
        num_batches=num_batches,
        max_length=cfg.data.max_length,
        truncation=cfg.data.truncation,
    )
    results = analyze_model(model, batches, diagnostics=wanted, top_k=top_k, max_layers=max_layers)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "analysis"
    header = (
        f"Run `{run_dir}`: method `{model.method.name}`, {len(model.tasks)} tasks, {num_batches} batch(es) "
        f"of {batch_size} {split} examples per task."
    )
    paths = write_analysis(results, out, header)
    return {**paths, "out_dir": str(out), "diagnostics": results}
