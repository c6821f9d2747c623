"""Router usage and entropy per expert (HydraLoRA, mtLoRA, token-gated MoE-LoRA; task-gated MoE-LoRA's gates).

For every routed adapter layer a forward pass over a few batches per task records the routing weights pi
(per token, per routing group, a distribution over the E experts; padding left out). Reported per layer: the
mean routing weight of each expert (usage; 1/E each = balanced), the mean entropy -sum_e pi_e log pi_e of the
per-token distributions (log E = uniform routing, 0 = one expert per token), and how different the tasks'
usage is (mean total-variation distance between the tasks' usage vectors). MoE-LoRA with task gating has one
gate per task instead; its usage and entropy are those gates'.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.layers import AdapterLayer
from .common import BatchesByTask, Diagnostic, pairs, pyplot, save_figure, short_name, to_device


def routing_stats(pi: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, float, float]:
    """Sum of routing weights per expert, sum of per-distribution entropies, and the number of distributions.

    ``pi``: (..., G, E) routing weights (a distribution over E for every token and group); ``mask``: the
    token mask matching ``pi.shape[:-2]`` (0 = padding, left out) or None. Returns ``(usage_sum (E,),
    entropy_sum, count)``; divide by ``count`` for the means.
    """
    experts = pi.shape[-1]
    p = pi.detach().double().reshape(-1, pi.shape[-2], experts)
    if mask is not None and tuple(mask.shape) == tuple(pi.shape[:-2]):
        keep = mask.reshape(-1).bool().to(p.device)
        p = p[keep]
    p = p.reshape(-1, experts)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    return p.sum(0).cpu(), float(entropy.sum()), float(p.shape[0])


def mean_routing_stats(pi: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Mean routing weight per expert (E,) and mean entropy (nats) of routing weights ``pi`` (..., G, E)."""
    usage, ent, n = routing_stats(pi, mask)
    return usage / max(n, 1.0), ent / max(n, 1.0)


def routed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Adapter layers with a per-token router (``routed`` capability: they report their routing weights to
    routing observers)."""
    return {n: m for n, m in model.adapter_layers.items() if isinstance(m, AdapterLayer) and m.routed}


def task_gated_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Adapter layers with one gate per task (``task_gated`` capability: MoE-LoRA gating='task')."""
    return {n: m for n, m in model.adapter_layers.items() if isinstance(m, AdapterLayer) and m.task_gated}


@torch.no_grad()
def collect_routing(model: nn.Module, batches: BatchesByTask) -> dict[str, dict[str, dict[str, Any]]]:
    """``{layer: {task: {"usage": (E,), "entropy": float, "count": float}}}`` from forward passes (sums)."""
    layers = routed_layers(model)
    store: dict[str, dict[str, dict[str, Any]]] = {n: {} for n in layers}
    current = {"task": ""}

    def make_capture(name: str):
        def capture(layer: nn.Module, pi: torch.Tensor) -> None:
            usage, ent, n = routing_stats(pi, layer.context.token_mask)
            slot = store[name].setdefault(
                current["task"], {"usage": torch.zeros_like(usage), "entropy": 0.0, "count": 0.0}
            )
            slot["usage"] += usage
            slot["entropy"] += ent
            slot["count"] += n

        return capture

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    handles = [layer.add_routing_observer(make_capture(name)) for name, layer in layers.items()]
    try:
        for task, task_batches in batches.items():
            current["task"] = task
            for batch in task_batches:
                batch = to_device(batch, device)
                model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "task_ids")})
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return store


@torch.no_grad()
def task_gate_usage(model: nn.Module) -> dict[str, dict[str, dict[str, Any]]]:
    """Task-gated MoE-LoRA: each task's gate as ``{layer: {task: {"usage", "entropy", "count": 1}}}``."""
    tasks = list(model.adapter_config.tasks)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, layer in task_gated_layers(model).items():
        ids = torch.arange(len(tasks), device=layer.lora_gate.device)
        gates = layer.task_gate(ids).double().cpu()  # (T, E)
        ent = -(gates * gates.clamp_min(1e-30).log()).sum(-1)
        out[name] = {t: {"usage": gates[i], "entropy": float(ent[i]), "count": 1.0} for i, t in enumerate(tasks)}
    return out


def router_usage(stats: dict[str, dict[str, dict[str, Any]]], kind: str = "token router") -> Diagnostic:
    """Per layer: usage per expert, mean entropy (and normalized by log E), task divergence of the usage.

    ``stats``: from :func:`collect_routing` or :func:`task_gate_usage` (sums over distributions with counts).
    """
    rows, per_layer = [], []
    tasks: list[str] = []
    for name, by_task in stats.items():
        if not by_task:
            continue
        tasks = list(by_task)
        usage_sum = sum(v["usage"] for v in by_task.values())
        count = sum(v["count"] for v in by_task.values())
        usage = usage_sum / max(count, 1.0)
        entropy = sum(v["entropy"] for v in by_task.values()) / max(count, 1.0)
        experts = int(usage.numel())
        per_task = {t: (v["usage"] / max(v["count"], 1.0)).tolist() for t, v in by_task.items()}
        tv = [
            0.5 * float((torch.tensor(per_task[tasks[i]]) - torch.tensor(per_task[tasks[j]])).abs().sum())
            for i, j in pairs(len(tasks))
        ]
        max_ent = math.log(experts) if experts > 1 else float("nan")
        entry = {
            "layer": name,
            "experts": experts,
            "usage": usage.tolist(),
            "entropy": entropy,
            "normalized_entropy": entropy / max_ent if experts > 1 else float("nan"),
            "max_entropy": max_ent,
            "task_usage": per_task,
            "task_divergence": sum(tv) / len(tv) if tv else float("nan"),
        }
        per_layer.append(entry)
        rows.append(
            [
                short_name(name),
                experts,
                " ".join(f"{u:.3f}" for u in entry["usage"]),
                entropy,
                entry["normalized_entropy"],
                max(entry["usage"]),
                entry["task_divergence"],
            ]
        )
    diag = Diagnostic(
        name="router_usage",
        title="Router usage and entropy per expert",
        description=(
            f"Routing ({kind}) over a few batches per task, padding left out. `usage`: mean routing weight "
            "of each expert (1/E each = balanced); `entropy`: mean entropy of the routing distributions "
            "in nats (log E = uniform, 0 = one expert per token), also divided by log E; `task "
            "divergence`: mean total-variation distance between tasks' usage vectors (0 = every task "
            "routes alike)."
        ),
        header=[
            "layer",
            "experts",
            "usage per expert",
            "entropy (nats)",
            "entropy / log E",
            "max usage",
            "task divergence",
        ],
        rows=rows,
        data={"kind": kind, "tasks": tasks, "layers": per_layer},
        applicable=bool(per_layer),
        note="" if per_layer else "the method has no router (HydraLoRA, mtLoRA and MoE-LoRA have one)",
    )
    diag.plot = lambda path: _plot_router(diag, path)
    return diag


def router_diagnostic(model: nn.Module, batches: BatchesByTask) -> Diagnostic:
    """Router usage of the model: token routers from a forward pass, or MoE-LoRA's task gates."""
    if task_gated_layers(model):
        return router_usage(task_gate_usage(model), kind="task gate, one per task")
    return router_usage(collect_routing(model, batches) if routed_layers(model) else {})


def _plot_router(diag: Diagnostic, path: Path) -> None:
    plt = pyplot()
    layers = diag.data["layers"]
    experts = max(e["experts"] for e in layers)
    grid = [[*e["usage"], *([float("nan")] * (experts - e["experts"]))] for e in layers]
    fig, axes = plt.subplots(1, 2, figsize=(13, max(3.5, 0.18 * len(layers) + 2)))
    im = axes[0].imshow(grid, aspect="auto", cmap="viridis", vmin=0.0)
    axes[0].set_xlabel("expert")
    axes[0].set_xticks(range(experts))
    axes[0].set_ylabel("layer")
    axes[0].set_yticks(range(len(layers)))
    axes[0].set_yticklabels([short_name(e["layer"]) for e in layers], fontsize=6 if len(layers) > 12 else 8)
    axes[0].set_title(f"mean routing weight per expert (balanced = {1 / experts:.3f})")
    fig.colorbar(im, ax=axes[0], fraction=0.046)
    xs = list(range(len(layers)))
    axes[1].bar(xs, [e["normalized_entropy"] for e in layers], color="tab:green", alpha=0.7, label="entropy / log E")
    axes[1].plot(xs, [e["task_divergence"] for e in layers], color="tab:red", marker=".", label="task divergence")
    axes[1].set_ylim(0, 1.05)
    axes[1].set_xlabel("layer (index)")
    axes[1].set_title("routing entropy (1 = uniform) and task divergence")
    axes[1].legend(fontsize=8)
    save_figure(fig, path)
