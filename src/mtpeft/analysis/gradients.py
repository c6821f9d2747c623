"""Per-task gradients and inter-task gradient conflict per layer.

For every task, the gradient of the language-model loss (no auxiliary losses, dropout off) is accumulated over
a few of its batches, for each adapter layer's own parameters (the *adapter space*) and, for linear adapters,
for the frozen base weight W (the *base space*: dL/dW = sum over tokens of g x^T, taken from the layer's input
x and output gradient g). Two tasks conflict at a layer when their gradients there point in opposite
directions (negative cosine): training on one then undoes progress on the other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .common import (
    BatchesByTask,
    Diagnostic,
    adapter_parameters,
    heatmap,
    pairs,
    save_figure,
    short_name,
    to_device,
    two_panel_figure,
)


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


class BaseWeightGradients:
    """Accumulates the gradient of the loss with respect to the weight of each given linear-like module,
    dL/dW = sum over tokens of g x^T (x: the module's input, g: its output gradient), over every backward
    pass while active: nothing needs the weight itself to require a gradient.

    Use as a context manager around the forward and backward passes; :attr:`grads` holds ``{name: dL/dW}``
    (float32, d_out x d_in) for the modules whose output took part in a backward; :meth:`reset` empties it.
    It needs nothing but torch, so that one hook can serve the diagnostics and a method's calibration alike.
    """

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self.grads: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            x = args[0].detach()

            def on_grad(g: torch.Tensor) -> None:
                contribution = g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
                self.grads[name] = self.grads[name] + contribution if name in self.grads else contribution

            output.register_hook(on_grad)

        return hook

    def reset(self) -> None:
        """Forget the gradients accumulated so far."""
        self.grads.clear()

    def __enter__(self) -> BaseWeightGradients:
        self._handles = [m.register_forward_hook(self._forward_hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


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
    capture = BaseWeightGradients({name: model.adapter_layers[name] for name in base_layers})
    out = TaskGradients()
    try:
        for ps in params.values():
            for _, p in ps:
                p.requires_grad_(True)
        model.eval()
        with capture:
            for task, task_batches in batches.items():
                model.zero_grad(set_to_none=True)
                capture.reset()
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
                out.base[task] = {n: (g / len(task_batches)).cpu() for n, g in capture.grads.items()}
    finally:
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


def _concat(by_layer: dict[str, torch.Tensor], layers: Sequence[str]) -> torch.Tensor:
    """A task's gradients of ``layers`` as one vector (a zero vector without layers)."""
    return torch.cat([by_layer[x].reshape(-1) for x in layers]) if layers else torch.zeros(1)


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
                a, b = _concat(grads[tasks[i]], layers), _concat(grads[tasks[j]], layers)
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
        c = cosine(_concat(grads[tasks[i]], layers), _concat(grads[tasks[j]], layers))
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
    layers = diag.data["layers"][:-1]
    tasks = diag.data["tasks"]
    fig, axes = two_panel_figure()
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
    heatmap(axes[1], diag.data["pair_cosine"], tasks, "cosine of task gradients (all layers)", vmin=-1, vmax=1)
    save_figure(fig, path)

