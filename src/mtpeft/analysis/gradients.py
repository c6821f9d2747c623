"""Per-task gradients and inter-task gradient conflict per layer.

For every task, the gradient of the language-model loss (no auxiliary losses, dropout off) is accumulated over
a few of its batches, for each adapter layer's own parameters (the *adapter space*) and, for linear adapters,
for the frozen base weight W (the *base space*: dL/dW = sum over tokens of g x^T, taken from the layer's input
x and output gradient g). Two tasks conflict at a layer when their gradients there point in opposite
directions (negative cosine): training on one then undoes progress on the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .common import BatchesByTask, Diagnostic, adapter_parameters, pairs, pyplot, short_name, to_device


@dataclass
class TaskGradients:
    """Per-task gradients.

    Attributes:
        adapter: ``{task: {layer: {param: grad}}}`` of each adapter layer's own parameters.
        base: ``{task: {layer: dL/dW}}`` (d_out x d_in) for the linear-adapter layers asked for.
    """

    adapter: dict[str, dict[str, dict[str, torch.Tensor]]] = field(default_factory=dict)
    base: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def flat(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{task: {layer: vector}}``: each layer's adapter gradients concatenated."""
        return {
            t: {layer: torch.cat([g.reshape(-1) for g in params.values()]) for layer, params in layers.items()}
            for t, layers in self.adapter.items()
        }


def collect_task_gradients(
    model: nn.Module, batches: BatchesByTask, *, base_layers: Sequence[str] = ()
) -> TaskGradients:
    """Accumulate each task's LM-loss gradient over its batches (mean over batches).

    ``model`` is an MTModel; the adapters are made trainable for the duration (their previous
    ``requires_grad`` is restored) and the model runs in eval mode (no dropout, no auxiliary losses).
    ``base_layers`` names linear-adapter layers whose base-weight gradient is collected as well.
    """
    params = adapter_parameters(model)
    flags = {id(p): p.requires_grad for ps in params.values() for _, p in ps}
    was_training = model.training
    device = next(model.parameters()).device
    base_grads: dict[str, torch.Tensor] = {}
    hooks = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach()
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return

            def on_grad(g: torch.Tensor) -> None:
                contribution = g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
                base_grads[name] = base_grads[name] + contribution if name in base_grads else contribution

            output.register_hook(on_grad)

        return hook

    for name in base_layers:
        hooks.append(model.adapter_layers[name].register_forward_hook(make_hook(name)))
    out = TaskGradients()
    try:
        for ps in params.values():
            for _, p in ps:
                p.requires_grad_(True)
        model.eval()
        for task, task_batches in batches.items():
            model.zero_grad(set_to_none=True)
            base_grads.clear()
            with torch.enable_grad():
                for batch in task_batches:
                    loss = model(**to_device(batch, device)).loss
                    (loss / len(task_batches)).backward()
            out.adapter[task] = {
                layer: {
                    n: (
                        p.grad.detach().float().cpu().clone()
                        if p.grad is not None
                        else torch.zeros(p.shape, dtype=torch.float32)
                    )
                    for n, p in ps
                }
                for layer, ps in params.items()
            }
            out.base[task] = {n: (g / len(task_batches)).cpu() for n, g in base_grads.items()}
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
        for ps in params.values():
            for _, p in ps:
                p.requires_grad_(flags[id(p)])
        model.train(was_training)
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Cosine similarity of two flattened tensors (None if either is zero)."""
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return None
    return float(a @ b / (na * nb))


def gradient_conflict(grads: dict[str, dict[str, torch.Tensor]], space: str = "adapter") -> Diagnostic:
    """Per layer: the share of task pairs whose gradients have a negative cosine, and the mean cosine.

    ``grads``: ``{task: {layer: gradient}}`` (any shapes; a layer's gradient is flattened). Pairs where a
    gradient is zero are left out. The last row, ``(all layers)``, uses each task's gradients of every layer
    concatenated. ``data["pair_cosine"]`` is the task x task matrix of that overall cosine.
    """
    tasks = list(grads)
    layers = [layer for layer in (next(iter(grads.values())) if grads else {}) if all(layer in grads[t] for t in tasks)]
    rows, per_layer = [], []
    for layer in [*layers, None]:
        cos = []
        for i, j in pairs(len(tasks)):
            if layer is None:
                a = torch.cat([grads[tasks[i]][x].reshape(-1) for x in layers]) if layers else torch.zeros(1)
                b = torch.cat([grads[tasks[j]][x].reshape(-1) for x in layers]) if layers else torch.zeros(1)
            else:
                a, b = grads[tasks[i]][layer], grads[tasks[j]][layer]
            c = cosine(a, b)
            if c is not None:
                cos.append(c)
        neg = sum(c < 0 for c in cos) / len(cos) if cos else float("nan")
        mean = sum(cos) / len(cos) if cos else float("nan")
        entry = {
            "layer": layer or "(all layers)",
            "pairs": len(cos),
            "negative_fraction": neg,
            "mean_cosine": mean,
            "min_cosine": min(cos) if cos else float("nan"),
        }
        per_layer.append(entry)
        rows.append(
            [
                short_name(entry["layer"]),
                entry["pairs"],
                100 * neg if cos else float("nan"),
                mean,
                entry["min_cosine"],
            ]
        )
    matrix = [[1.0 if i == j else float("nan") for j in range(len(tasks))] for i in range(len(tasks))]
    for i, j in pairs(len(tasks)):
        a = torch.cat([grads[tasks[i]][x].reshape(-1) for x in layers]) if layers else torch.zeros(1)
        b = torch.cat([grads[tasks[j]][x].reshape(-1) for x in layers]) if layers else torch.zeros(1)
        c = cosine(a, b)
        matrix[i][j] = matrix[j][i] = float("nan") if c is None else c
    diag = Diagnostic(
        name="gradient_conflict",
        title="Inter-task gradient conflict",
        description=(
            f"Per layer, each task's gradient of the LM loss ({space} space) over a few of its batches; "
            "for every pair of tasks the cosine of their gradients. `% negative` is the share of task "
            "pairs that pull in opposite directions (conflict); -1 = exactly opposite, +1 = aligned."
        ),
        header=["layer", "task pairs", "% negative", "mean cosine", "min cosine"],
        rows=rows,
        data={"tasks": tasks, "space": space, "layers": per_layer, "pair_cosine": matrix},
        applicable=len(tasks) >= 2 and bool(layers),
        note="" if len(tasks) >= 2 else "needs at least two tasks",
    )
    diag.plot = lambda path: _plot_conflict(diag, path)
    return diag


def _plot_conflict(diag: Diagnostic, path: Path) -> None:
    plt = pyplot()
    layers = diag.data["layers"][:-1]
    tasks = diag.data["tasks"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    xs = list(range(len(layers)))
    axes[0].bar(
        xs,
        [100 * e["negative_fraction"] for e in layers],
        color="tab:red",
        alpha=0.6,
        label="% negative pairs",
    )
    ax2 = axes[0].twinx()
    ax2.plot(xs, [e["mean_cosine"] for e in layers], color="tab:blue", marker=".", label="mean cosine")
    ax2.axhline(0, color="gray", lw=0.5)
    ax2.set_ylim(-1.05, 1.05)
    ax2.set_ylabel("mean cosine")
    axes[0].set_ylim(0, 100)
    axes[0].set_ylabel("% task pairs with negative cosine")
    axes[0].set_xlabel("adapter layer (index; see the table)")
    axes[0].set_title("gradient conflict per layer")
    _heatmap(axes[1], diag.data["pair_cosine"], tasks, "cosine of task gradients (all layers)", vmin=-1, vmax=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _heatmap(
    ax: Any, matrix: list[list[float]], labels: list[str], title: str, vmin: float = -1.0, vmax: float = 1.0
) -> None:
    im = ax.imshow(matrix, cmap="coolwarm", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(labels)))
    ax.set_yticks(range(len(labels)))
    size = 8 if len(labels) <= 10 else 5
    ax.set_xticklabels(labels, rotation=90, fontsize=size)
    ax.set_yticklabels(labels, fontsize=size)
    ax.set_title(title, fontsize=9)
    ax.figure.colorbar(im, ax=ax, fraction=0.046)
