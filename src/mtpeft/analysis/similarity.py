"""Per-layer similarity of task representations (as in TA-LoRA's layer analysis).

Each task's representation at a layer is the mean hidden state over all non-padding tokens of a few of its
batches (``output_hidden_states``: the embeddings, then every layer's output). The similarity of two tasks at
a layer is the cosine of their mean hidden states; where it is high, tasks look alike to the model and can
share parameters; where it drops, task-specific capacity is likely to help. Raw hidden states of language
models share a large common component, so absolute values run high: compare layers and methods, not the
numbers with 1.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .common import BatchesByTask, Diagnostic, heatmap, pairs, save_figure, to_device, two_panel_figure


@torch.no_grad()
def task_mean_hidden_states(model: nn.Module, batches: BatchesByTask) -> dict[str, torch.Tensor]:
    """``{task: (num_layers + 1, hidden)}``: each layer's mean hidden state over the non-padding tokens."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, torch.Tensor] = {}
    try:
        for task, task_batches in batches.items():
            total, count = None, 0.0
            for batch in task_batches:
                batch = to_device(batch, device)
                inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "task_ids")}
                res = model(**inputs, output_hidden_states=True)
                states = torch.stack([h.float() for h in res.hidden_states])  # (L+1, b, n, d)
                mask = batch["attention_mask"].to(states.dtype)[None, :, :, None]
                summed = (states * mask).sum(dim=(1, 2))
                total = summed if total is None else total + summed
                count += float(mask.sum())
            out[task] = (total / max(count, 1.0)).cpu()
    finally:
        model.train(was_training)
    return out


def cosine_matrix(vectors: list[torch.Tensor]) -> torch.Tensor:
    """Pairwise cosine similarities of vectors (n x n)."""
    x = torch.stack([v.double().reshape(-1) for v in vectors])
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return x @ x.T


def layer_similarity(means: dict[str, torch.Tensor]) -> Diagnostic:
    """Per layer: mean, min and max cosine between the tasks' mean hidden states (from
    :func:`task_mean_hidden_states`; ``{task: (layers, hidden)}``)."""
    tasks = list(means)
    num_layers = int(next(iter(means.values())).shape[0]) if means else 0
    rows, per_layer = [], []
    for layer in range(num_layers):
        sim = cosine_matrix([means[t][layer] for t in tasks])
        values = [float(sim[i, j]) for i, j in pairs(len(tasks))]
        entry = {
            "layer": layer,
            "mean_cosine": sum(values) / len(values) if values else float("nan"),
            "min_cosine": min(values) if values else float("nan"),
            "max_cosine": max(values) if values else float("nan"),
            "matrix": sim.tolist(),
        }
        per_layer.append(entry)
        label = "embeddings" if layer == 0 else str(layer)
        rows.append([label, *(entry[key] for key in ("mean_cosine", "min_cosine", "max_cosine"))])
    diag = Diagnostic(
        name="layer_similarity",
        title="Per-layer similarity of task representations",
        description=(
            "Each task's mean hidden state (non-padding tokens of a few batches) per layer (0 = the "
            "embeddings); the cosine between tasks' means. High = the tasks look alike to the model at "
            "that layer; a drop marks where task-specific processing starts."
        ),
        header=["layer", "mean cosine", "min cosine", "max cosine"],
        rows=rows,
        data={"tasks": tasks, "layers": per_layer},
        applicable=len(tasks) >= 2 and num_layers > 0,
        note="" if len(tasks) >= 2 else "needs at least two tasks",
    )
    diag.plot = lambda path: _plot_similarity(diag, path)
    return diag


def _plot_similarity(diag: Diagnostic, path: Path) -> None:
    layers = diag.data["layers"]
    fig, axes = two_panel_figure()
    xs = [e["layer"] for e in layers]
    axes[0].plot(xs, [e["mean_cosine"] for e in layers], marker="o", label="mean")
    axes[0].fill_between(
        xs, [e["min_cosine"] for e in layers], [e["max_cosine"] for e in layers], alpha=0.2, label="min..max"
    )
    axes[0].set_xlabel("layer (0 = embeddings)")
    axes[0].set_ylabel("cosine of task mean hidden states")
    axes[0].set_title("task representation similarity per layer")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    heatmap(axes[1], layers[-1]["matrix"], diag.data["tasks"], "last layer", vmin=-1.0, vmax=1.0)
    save_figure(fig, path)
