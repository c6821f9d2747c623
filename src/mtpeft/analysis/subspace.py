"""Overlap between task subspaces: principal angles between row spaces, per layer.

For ThanoRA the task subspaces are the row spaces of each task's block A_t of the down-projection (rows
``rank_offsets[t]:rank_offsets[t+1]`` of ``lora_A``): the method means to keep them apart, and its
block-orthogonality regularizer pushes them towards overlap 0. For other methods a task's subspace is the
span of the top-k right singular vectors of its task matrix M_t (see :mod:`mtpeft.analysis.spectral`):
the input directions its update (or its gradient) uses.

The overlap of two subspaces with orthonormal bases Q_a (r_a x d), Q_b (r_b x d) is
||Q_a Q_b^T||_F^2 / min(r_a, r_b), the mean squared cosine of their principal angles: 0 = orthogonal,
1 = one contains the other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..core.layers import AdapterLayer
from .common import Diagnostic, heatmap, pairs, save_figure, short_name, top_singular, two_panel_figure
from .spectral import TaskMatrices


def orthonormal_rows(a: torch.Tensor, tol: float = 1e-8) -> torch.Tensor:
    """An orthonormal basis (rows) of the row space of ``a`` (r x d); numerically zero directions dropped."""
    a = a.double()
    if a.numel() == 0:
        return a
    _, s, vh = torch.linalg.svd(a, full_matrices=False)
    if s.numel() == 0 or float(s.max()) <= 0:
        return vh[:0]
    return vh[s > tol * s.max()]


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (degrees, ascending) between the row spaces of ``a`` (r_a x d) and ``b`` (r_b x d)."""
    qa, qb = orthonormal_rows(a), orthonormal_rows(b)
    if qa.shape[0] == 0 or qb.shape[0] == 0:
        return torch.empty(0, dtype=torch.float64)
    cos = torch.linalg.svdvals(qa @ qb.T).clamp(0.0, 1.0)
    return torch.rad2deg(torch.arccos(cos))


def subspace_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """||Q_a Q_b^T||_F^2 / min(r_a, r_b) for the row spaces of ``a`` and ``b``: 0 orthogonal, 1 nested."""
    qa, qb = orthonormal_rows(a), orthonormal_rows(b)
    if qa.shape[0] == 0 or qb.shape[0] == 0:
        return float("nan")
    return float((qa @ qb.T).pow(2).sum()) / min(qa.shape[0], qb.shape[0])


def top_right_singular(m: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k right singular vectors (rows) of ``m`` (the input directions it uses most)."""
    _, _, v = top_singular(m, k)
    return v.T


def thanora_blocks(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """``{layer: {task: A_t}}``: each ThanoRA layer's per-task blocks of ``lora_A``."""
    tasks = list(model.adapter_config.tasks)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, layer in model.adapter_layers.items():
        if isinstance(layer, AdapterLayer) and layer.task_blocks:
            offsets = layer.rank_offsets.tolist()
            a = layer.lora_A.detach().float().cpu()
            out[name] = {t: a[offsets[i] : offsets[i + 1]] for i, t in enumerate(tasks)}
    return out


def overlap_table(bases: dict[str, dict[str, torch.Tensor]], description: str, note: str = "") -> Diagnostic:
    """Pairwise subspace overlap per layer from ``{layer: {task: rows spanning the task's subspace}}``."""
    rows, per_layer = [], []
    tasks: list[str] = []
    for name, by_task in bases.items():
        tasks = list(by_task)
        overlaps, angles = [], []
        matrix = [[1.0 if i == j else float("nan") for j in range(len(tasks))] for i in range(len(tasks))]
        for i, j in pairs(len(tasks)):
            o = subspace_overlap(by_task[tasks[i]], by_task[tasks[j]])
            ang = principal_angles(by_task[tasks[i]], by_task[tasks[j]])
            matrix[i][j] = matrix[j][i] = o
            if not math.isnan(o):
                overlaps.append(o)
            if ang.numel():
                angles.append(float(ang.min()))
        dims = [int(orthonormal_rows(by_task[t]).shape[0]) for t in tasks]
        entry = {
            "layer": name,
            "dims": dims,
            "mean_overlap": _mean(overlaps),
            "max_overlap": max(overlaps) if overlaps else float("nan"),
            "mean_min_angle_deg": _mean(angles),
            "pair_overlap": matrix,
        }
        per_layer.append(entry)
        stats = (entry[key] for key in ("mean_overlap", "max_overlap", "mean_min_angle_deg"))
        rows.append([short_name(name), "/".join(map(str, dims)), *stats])
    diag = Diagnostic(
        name="subspace_overlap",
        title="Overlap between task subspaces",
        description=description,
        header=[
            "layer",
            "dims per task",
            "mean overlap",
            "max overlap",
            "mean smallest principal angle (deg)",
        ],
        rows=rows,
        data={"tasks": tasks, "layers": per_layer},
        applicable=bool(per_layer) and len(tasks) >= 2,
        note=note or ("" if per_layer else "no layer has per-task subspaces"),
    )
    diag.plot = lambda path: _plot_overlap(diag, path)
    return diag


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def task_subspace_overlap(
    model: nn.Module, matrices: TaskMatrices | None = None, k: int = 4, sources: dict[str, str] | None = None
) -> Diagnostic:
    """ThanoRA: overlap between the blocks' A_t row spaces; other methods: between the top-k right singular
    subspaces of the task matrices."""
    blocks = thanora_blocks(model)
    if blocks:
        return overlap_table(
            blocks,
            "Per ThanoRA layer, the row spaces of the task blocks A_t of the "
            "down-projection; overlap = mean squared cosine of the principal angles (0 = orthogonal "
            "blocks, 1 = the same subspace).",
            note="task subspaces: ThanoRA blocks A_t",
        )
    bases: dict[str, dict[str, torch.Tensor]] = {}
    tasks = list(matrices or {})
    if tasks:
        for name in matrices[tasks[0]]:
            if all(name in matrices[t] for t in tasks):
                bases[name] = {t: top_right_singular(matrices[t][name], k) for t in tasks}
    used = sorted(set((sources or {}).values()))
    return overlap_table(
        bases,
        f"Per layer, each task's subspace = the top-{k} right singular vectors of its task "
        "matrix M_t (the input directions its update or gradient uses); overlap = mean squared "
        "cosine of the principal angles (0 = orthogonal, 1 = the same subspace).",
        note=("task matrices from: " + ", ".join(used)) if used else "",
    )


def _plot_overlap(diag: Diagnostic, path: Path) -> None:
    layers = diag.data["layers"]
    fig, axes = two_panel_figure()
    xs = list(range(len(layers)))
    axes[0].plot(xs, [e["mean_overlap"] for e in layers], marker="o", label="mean overlap")
    axes[0].plot(xs, [e["max_overlap"] for e in layers], marker="^", label="max overlap")
    axes[0].set_ylim(-0.05, 1.05)
    axes[0].set_xticks(xs)
    axes[0].set_xticklabels([short_name(e["layer"]) for e in layers], rotation=60, ha="right", fontsize=6)
    axes[0].set_ylabel("subspace overlap")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    axes[0].set_title("task-subspace overlap per layer")
    last = layers[-1]
    heatmap(
        axes[1],
        last["pair_overlap"],
        diag.data["tasks"],
        f"pairwise overlap, {short_name(last['layer'])}",
        vmin=0.0,
        vmax=1.0,
    )
    save_figure(fig, path)
