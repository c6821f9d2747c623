"""Per-task update matrices and the spectral alignment of task updates.

Each task t gets one matrix M_t per adapted layer (:func:`task_matrices`): its own weight update where the
method has one per task (MTL-LoRA, task-gated MoE-LoRA: ``delta_weight(t)``), its prompt (TA-LoRA:
P_t = P_0 + s B A_t), and otherwise its gradient of the frozen base weight (methods with one update for all
tasks: where tasks differ is in where they push that update) or, for block adapters, its gradient of the
down-projection A.

:func:`spectral_alignment` asks how much of what the tasks share lies in the top-k singular directions of the
shared update S = mean_t M_t (U_k, V_k its top-k singular vectors, P(M) = U_k^T M V_k):

* ``shared top-k energy`` = sum_{i<k} sigma_i^2 / sum_i sigma_i^2 of S (how low-rank the shared update is);
* ``task energy in top-k`` = mean_t ||P(M_t)||^2 / ||M_t||^2 (how much of each task's update lives there);
* ``mean task alignment`` = sum_{s != t} <M_s, M_t> / ((T - 1) sum_t ||M_t||^2), in [-1/(T-1), 1]: how much
  the tasks agree at all (1 = identical updates, 0 = orthogonal);
* ``cross-task alignment captured`` = sum_{s != t} <P(M_s), P(M_t)> / sum_{s != t} <M_s, M_t>: the share of
  the tasks' mutual agreement (Frobenius inner products) carried by the top-k directions. 1 when all shared
  structure is in the top k; it can exceed 1 or be negative when tasks disagree outside them. It is NaN when
  the mean task alignment is below ``min_alignment`` (0.05) in absolute value: then the tasks share almost
  nothing and the ratio of two small numbers means nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..core.layers import AdapterLayer, LinearAdapter
from .common import Diagnostic, pyplot, save_figure, short_name, top_singular
from .gradients import TaskGradients

TaskMatrices = dict[str, dict[str, torch.Tensor]]


def _is_linear_adapter(layer: nn.Module) -> bool:
    return isinstance(layer, LinearAdapter)


def _is_prompted(layer: nn.Module) -> bool:
    """The ``prompted`` capability: per-task prompts from ``task_prompts(task_ids)``."""
    return isinstance(layer, AdapterLayer) and layer.prompted


def _is_block_adapter(layer: nn.Module) -> bool:
    """``export_kind == 'block'``: a path around a whole block; its M_t is the gradient of its ``lora_A``."""
    return isinstance(layer, AdapterLayer) and layer.export_kind == "block"


def select_layers(names: Sequence[str], max_layers: int | None) -> list[str]:
    """At most ``max_layers`` names spread evenly over ``names`` (all when None or enough)."""
    names = list(names)
    if max_layers is None or len(names) <= max_layers:
        return names
    if max_layers <= 1:
        return names[-1:]
    step = (len(names) - 1) / (max_layers - 1)
    return [names[round(i * step)] for i in range(max_layers)]


def matrix_layers(model: nn.Module, max_layers: int | None = 8) -> list[str]:
    """The adapter layers that get task matrices (all that can have one, thinned to ``max_layers``)."""
    usable = [
        n
        for n, m in model.adapter_layers.items()
        if _is_linear_adapter(m) or _is_prompted(m) or _is_block_adapter(m)
    ]
    return select_layers(usable, max_layers)


def matrix_source(model: nn.Module, layer: nn.Module) -> str:
    """How :func:`task_matrices` builds a layer's M_t: 'delta', 'prompt', 'base_gradient' or 'A_gradient'."""
    if _is_linear_adapter(layer) and model.merge_kind == "per_task":
        return "delta"
    if _is_prompted(layer):
        return "prompt"
    if _is_linear_adapter(layer):
        return "base_gradient"
    return "A_gradient"


@torch.no_grad()
def task_matrices(
    model: nn.Module, layers: Sequence[str], gradients: TaskGradients | None, tasks: Sequence[str]
) -> tuple[TaskMatrices, dict[str, str]]:
    """``({task: {layer: M_t}}, {layer: source})`` for the given layers (see the module docstring).

    ``gradients`` must hold base-weight gradients for 'base_gradient' layers and adapter gradients for
    'A_gradient' layers (from :func:`~mtpeft.analysis.gradients.collect_task_gradients`); layers whose
    matrices cannot be had are left out.
    """
    out: TaskMatrices = {t: {} for t in tasks}
    sources: dict[str, str] = {}
    for name in layers:
        layer = model.adapter_layers[name]
        source = matrix_source(model, layer)
        mats: dict[str, torch.Tensor] = {}
        for tid, task in enumerate(tasks):
            if source == "delta":
                mats[task] = layer.delta_weight(tid).detach().float().cpu()
            elif source == "prompt":
                ids = torch.tensor([tid], device=next(layer.parameters()).device)
                mats[task] = layer.task_prompts(ids)[0].detach().float().cpu()
            elif source == "base_gradient" and gradients is not None and name in gradients.base.get(task, {}):
                mats[task] = gradients.base[task][name]
            elif (
                source == "A_gradient"
                and gradients is not None
                and "lora_A" in gradients.adapter.get(task, {}).get(name, {})
            ):
                mats[task] = gradients.adapter[task][name]["lora_A"]
        if len(mats) == len(tasks):
            sources[name] = source
            for task, m in mats.items():
                out[task][name] = m
    return out, sources


def alignment_numbers(matrices: Sequence[torch.Tensor], k: int, min_alignment: float = 0.05) -> dict[str, float]:
    """The spectral-alignment numbers of one layer's task matrices (see the module docstring)."""
    ms = [m.double() for m in matrices]
    shared = torch.stack(ms).mean(0)
    uk, s, vk = top_singular(shared, k)
    k = int(s.numel())
    total = float((shared**2).sum())
    shared_energy = float((s**2).sum()) / total if total > 0 else float("nan")
    proj = [uk.T @ m @ vk for m in ms]
    norms = [float((m**2).sum()) for m in ms]
    task_energy = [float((p**2).sum()) / n for p, n in zip(proj, norms) if n > 0]
    full_sum = torch.stack(ms).sum(0)
    proj_sum = torch.stack(proj).sum(0)
    cross_full = float((full_sum**2).sum()) - sum(norms)
    cross_proj = float((proj_sum**2).sum()) - sum(float((p**2).sum()) for p in proj)
    scale = sum(norms)
    alignment = cross_full / (scale * (len(ms) - 1)) if scale > 0 and len(ms) > 1 else float("nan")
    captured = cross_proj / cross_full if abs(alignment) >= max(min_alignment, 1e-12) else float("nan")
    return {
        "k": k,
        "shared_topk_energy": shared_energy,
        "task_energy_topk": sum(task_energy) / len(task_energy) if task_energy else float("nan"),
        "mean_task_alignment": alignment,
        "cross_alignment_captured": captured,
    }


def spectral_alignment(matrices: TaskMatrices, k: int = 4, sources: dict[str, str] | None = None) -> Diagnostic:
    """Per layer: how much of the tasks' shared update lies in its top-k singular directions.

    See the module docstring for the three numbers.

    ``matrices``: ``{task: {layer: M_t}}`` (same shapes per layer across tasks).
    """
    tasks = list(matrices)
    layers = [n for n in (matrices[tasks[0]] if tasks else {}) if all(n in matrices[t] for t in tasks)]
    rows, per_layer = [], []
    for name in layers:
        nums = alignment_numbers([matrices[t][name] for t in tasks], k)
        source = (sources or {}).get(name, "")
        per_layer.append({"layer": name, "source": source, **nums})
        rows.append(
            [
                short_name(name),
                source,
                nums["k"],
                nums["shared_topk_energy"],
                nums["task_energy_topk"],
                nums["mean_task_alignment"],
                nums["cross_alignment_captured"],
            ]
        )
    used = sorted(set((sources or {}).values()))
    diag = Diagnostic(
        name="spectral_alignment",
        title="Spectral alignment of task updates",
        description=(
            "Per layer, one matrix M_t per task (`source`: `delta` = the task's weight update, `prompt` = "
            "its prompt, `base_gradient` = its gradient of the frozen weight, `A_gradient` = its gradient "
            "of the adapter's A). S = mean_t M_t with top-k singular vectors U_k, V_k. `shared top-k "
            "energy`: share of ||S||^2 in the top k; `task energy in top-k`: mean over tasks of "
            "||U_k^T M_t V_k||^2 / ||M_t||^2; `mean task alignment`: sum over task pairs of <M_s, M_t> / "
            "((T - 1) sum_t ||M_t||^2) (1 = identical, 0 = orthogonal); `cross-task alignment captured`: sum "
            "over task pairs of <U_k^T M_s V_k, U_k^T M_t V_k> / sum of <M_s, M_t> (1 = all that tasks share "
            "lies in the top k; NaN when the mean task alignment is below 0.05: the tasks share almost nothing)."
        ),
        header=[
            "layer",
            "source",
            "k",
            "shared top-k energy",
            "task energy in top-k",
            "mean task alignment",
            "cross-task alignment captured",
        ],
        rows=rows,
        data={"tasks": tasks, "k": k, "layers": per_layer, "sources": used},
        applicable=len(tasks) >= 2 and bool(layers),
        note=("task matrices from: " + ", ".join(used))
        if used
        else ("needs at least two tasks" if len(tasks) < 2 else "no layer has per-task matrices"),
    )
    diag.plot = lambda path: _plot_alignment(diag, path)
    return diag


def _plot_alignment(diag: Diagnostic, path: Path) -> None:
    plt = pyplot()
    layers = diag.data["layers"]
    xs = list(range(len(layers)))
    fig, ax = plt.subplots(figsize=(max(7, 0.5 * len(layers) + 3), 4.5))
    for key, label, marker in (
        ("shared_topk_energy", "shared top-k energy", "o"),
        ("task_energy_topk", "task energy in top-k", "s"),
        ("mean_task_alignment", "mean task alignment", "d"),
        ("cross_alignment_captured", "cross-task alignment captured", "^"),
    ):
        ys = [e[key] if not (isinstance(e[key], float) and math.isnan(e[key])) else None for e in layers]
        ax.plot(xs, [float("nan") if y is None else y for y in ys], marker=marker, label=label)
    ax.set_xticks(xs)
    ax.set_xticklabels([short_name(e["layer"]) for e in layers], rotation=60, ha="right", fontsize=6)
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.set_ylabel("fraction")
    ax.set_title(f"spectral alignment of task updates (k = {diag.data['k']})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
