"""The benchmark report's PNG plots (matplotlib's Agg backend: no display needed).

A per-task grouped bar chart per setting, the macro score against trainable parameters, and for suites with
several settings (``bbh-scaling``) the macro score against the number of tasks per method. Each plot takes the
aggregates of :func:`mtpeft.bench.report.aggregate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .options import method_order


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _colors(methods: Sequence[str]) -> dict[str, Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def plot_per_task(setting_name: str, setting: dict[str, Any], path: Path) -> Path:
    """Grouped bar chart: tasks (and the macro average) on x, one bar per method, error bars = std."""
    plt = _plt()
    methods = list(setting["methods"])
    labels = [*setting["tasks"], "macro"] + [f"{t}*" for t in setting["unseen_tasks"]]
    colors = _colors(methods)
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.35 * len(labels) * max(2, len(methods)) / 2 + 2), 5))
    for i, m in enumerate(methods):
        stats = setting["methods"][m]
        vals = [stats["tasks"].get(t) for t in setting["tasks"]] + [stats["macro"]]
        vals += [stats["unseen"].get(t) for t in setting["unseen_tasks"]]
        means = [100 * (v["mean"] or 0.0) if v and v["mean"] is not None else 0.0 for v in vals]
        errs = [100 * v["std"] if v and v.get("std") else 0.0 for v in vals]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(
            xs,
            means,
            width,
            yerr=errs if any(errs) else None,
            label=m,
            color=colors[m],
            capsize=2 if len(labels) < 12 else 0,
        )
    ax.set_xticks(range(len(labels)))
    slanted = len(labels) > 6 or sum(len(x) for x in labels) > 60
    ax.set_xticklabels(labels, rotation=35 if slanted else 0, ha="right" if slanted else "center", fontsize=8)
    ax.set_ylabel("score (%)")
    title = f"per-task scores, setting {setting_name} (mean ± std over seeds)"
    if setting["unseen_tasks"]:
        title += "; * = unseen task"
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=min(5, len(methods)), loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_score_vs_params(agg: dict[str, Any], path: Path) -> Path:
    """Macro score against trainable parameters (log x), one point per method and setting; methods without
    trainable parameters (the untrained model) sit at the left edge, marked "0"."""
    plt = _plt()
    methods = method_order({m for s in agg.values() for m in s["methods"]})
    colors = _colors(methods)
    markers = "os^Dvx+P*"
    counts = [st["trainable_parameters"] for s in agg.values() for st in s["methods"].values()]
    positive = [c for c in counts if c]
    zero_x = min(positive) / 10 if positive else 1.0
    fig, ax = plt.subplots(figsize=(8, 5))
    seen: set[str] = set()
    for k, (sname, s) in enumerate(agg.items()):
        for m, stats in s["methods"].items():
            if stats["macro"]["mean"] is None:
                continue
            x = stats["trainable_parameters"] or zero_x
            y = 100 * stats["macro"]["mean"]
            ax.errorbar(
                [x],
                [y],
                yerr=[100 * (stats["macro"]["std"] or 0)],
                fmt=markers[k % len(markers)],
                color=colors[m],
                capsize=3,
                label=m if m not in seen else None,
            )
            seen.add(m)
            label = m if len(agg) == 1 else f"{m} ({sname})"
            ax.annotate(label, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=6, alpha=0.7)
    ax.set_xscale("log")
    if any(not c for c in counts):
        ticks = [t for t in ax.get_xticks() if t > zero_x * 1.5]
        ax.set_xticks([zero_x, *ticks])
        ax.set_xticklabels(["0", *[f"{t:.0e}" for t in ticks]])
        ax.set_xlim(zero_x / 2, max(positive or [zero_x]) * 3)
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("macro score (%)")
    ax.set_title("score vs trainable parameters" + (" (markers: settings)" if len(agg) > 1 else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_scaling(agg: dict[str, Any], path: Path, core_tasks: Sequence[str] = ()) -> Path:
    """Macro score vs number of tasks per method (and, with core tasks, the macro over the tasks every setting
    shares)."""
    plt = _plt()
    names = sorted(agg, key=lambda s: agg[s]["num_tasks"])
    methods = method_order({m for s in names for m in agg[s]["methods"]})
    colors = _colors(methods)
    panels = [("macro", "macro over the setting's tasks")]
    if core_tasks:
        panels.append(("core_macro", f"macro over the {len(core_tasks)} tasks of every setting"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for m in methods:
            xs, ys, es = [], [], []
            for s in names:
                stats = agg[s]["methods"].get(m)
                value = None if stats is None else stats.get(key)
                if value and value.get("mean") is not None:
                    xs.append(agg[s]["num_tasks"])
                    ys.append(100 * value["mean"])
                    es.append(100 * (value["std"] or 0))
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker="o", color=colors[m], label=m, capsize=3)
        ax.set_xlabel("number of tasks")
        ax.set_ylabel("score (%)")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([agg[s]["num_tasks"] for s in names])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle("does a method degrade as tasks are added?")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
