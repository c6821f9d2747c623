"""The benchmark report's PNG plots (matplotlib's Agg backend: no display needed).

A per-task grouped bar chart per setting, the macro score against trainable parameters, and for suites with
several settings (``bbh-scaling``) the macro score against the number of tasks per method. Each plot takes the
aggregates of :func:`mtpeft.bench.report.aggregate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..plotting import pyplot
from .options import method_order


def _colors(methods: Sequence[str]) -> dict[str, Any]:
    plt = pyplot()
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def max_seeds(stats: Sequence[dict[str, Any] | None]) -> int:
    """The largest number of seeds behind any of the ``mean_std`` stats (error bars need more than one)."""
    return max([int(st.get("n") or 0) for st in stats if st], default=0)


def seeds_phrase(n: int) -> str:
    """``"one seed"`` or ``"mean ± std over 3 seeds"`` for titles."""
    return "one seed" if n <= 1 else f"mean ± std over {n} seeds"


def human_count(x: float) -> str:
    """``7424 -> '7.4k'``, ``2400000 -> '2.4M'`` (tick labels of parameter counts)."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def plot_per_task(setting_name: str, setting: dict[str, Any], path: Path) -> Path:
    """Grouped bar chart: tasks (and the macro average) on x, one bar per method; error bars (std over seeds)
    only where a method ran several seeds; the value on top of each bar."""
    plt = pyplot()
    methods = list(setting["methods"])
    labels = [*setting["tasks"], "macro"] + [f"{t}*" for t in setting["unseen_tasks"]]
    colors = _colors(methods)
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.35 * len(labels) * max(2, len(methods)) / 2 + 2), 5))
    seeds = 0
    for i, m in enumerate(methods):
        stats = setting["methods"][m]
        vals = [stats["tasks"].get(t) for t in setting["tasks"]] + [stats["macro"]]
        vals += [stats["unseen"].get(t) for t in setting["unseen_tasks"]]
        seeds = max(seeds, max_seeds(vals))
        means = [100 * (v["mean"] or 0.0) if v and v["mean"] is not None else 0.0 for v in vals]
        errs = [100 * v["std"] if v and v.get("std") and (v.get("n") or 0) > 1 else 0.0 for v in vals]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(labels))]
        bars = ax.bar(xs, means, width, yerr=errs if any(errs) else None, label=m, color=colors[m],
                      capsize=2 if len(labels) < 12 else 0)
        if len(labels) * len(methods) <= 40:  # values on the bars while they stay readable
            ax.bar_label(bars, labels=[f"{v:.0f}" for v in means], fontsize=6, padding=1)
    ax.set_xticks(range(len(labels)))
    slanted = len(labels) > 6 or sum(len(x) for x in labels) > 60
    ax.set_xticklabels(labels, rotation=35 if slanted else 0, ha="right" if slanted else "center", fontsize=8)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, min(110, max(10.0, ax.get_ylim()[1] * 1.08)))
    title = f"Score per task and method, setting {setting_name!r} ({seeds_phrase(seeds)})"
    if setting["unseen_tasks"]:
        title += "\n* = unseen task (evaluated only)"
    ax.set_title(title, fontsize=11)
    ax.legend(fontsize=7, ncol=min(5, len(methods)), loc="upper center", bbox_to_anchor=(0.5, -0.1 if not slanted
              else -0.22), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def place_labels(ax: Any, points: Sequence[tuple[float, float, str, Any]], fontsize: float = 7) -> None:
    """Write each point's label beside it without overlapping another label or marker: candidate offsets are
    tried right, then above and below in growing steps, then left; a label moved away gets a thin leader line."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    taken = []
    for x, y in ((p[0], p[1]) for p in points):
        px, py = to_px((x, y))
        taken.append((px - 4, py - 4, px + 4, py + 4))  # the marker itself
    offsets = [(6, -3)] + [(6, s * k) for k in range(1, 9) for s in (10, -10)] + [(-6, -3)]
    order = sorted(range(len(points)), key=lambda i: (-points[i][1], points[i][0]))
    for i in order:
        x, y, text, color = points[i]
        placed = None
        for dx, dy in offsets:
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                              color=color, ha="left" if dx > 0 else "right", va="bottom" if dy > 0 else "center")
            box = ann.get_window_extent(renderer)
            rect = (box.x0, box.y0, box.x1, box.y1)
            inside = ax.get_window_extent(renderer)
            fits = inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
            if fits and not any(_overlap(rect, other) for other in taken):
                placed = (ann, rect, (dx, dy))
                break
            ann.remove()
        if placed is None:  # nowhere free: the first choice, still readable next to its marker
            dx, dy = offsets[0]
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                              color=color)
            box = ann.get_window_extent(renderer)
            placed = (ann, (box.x0, box.y0, box.x1, box.y1), (dx, dy))
        ann, rect, (dx, dy) = placed
        if abs(dy) > 5:  # moved away from its marker: the same label again, with a leader line
            ann.remove()
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                              color=color, ha="left" if dx > 0 else "right", va="bottom" if dy > 0 else "center",
                              arrowprops={"arrowstyle": "-", "color": color, "lw": 0.5, "alpha": 0.6})
        taken.append(rect)


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def plot_score_vs_params(agg: dict[str, Any], path: Path) -> Path:
    """Macro score against trainable parameters (log x), one point per method and setting, each labelled
    beside it (labels never overlap); error bars only where a method ran several seeds. Methods without
    trainable parameters (the untrained model) sit at the left edge, at the tick "0"."""
    plt = pyplot()
    methods = method_order({m for s in agg.values() for m in s["methods"]})
    colors = _colors(methods)
    markers = "os^Dvx+P*"
    counts = [st["trainable_parameters"] for s in agg.values() for st in s["methods"].values()]
    positive = [c for c in counts if c]
    zero_x = min(positive) / 10 if positive else 1.0
    seeds = max_seeds([st["macro"] for s in agg.values() for st in s["methods"].values()])
    fig, ax = plt.subplots(figsize=(8, 5))
    points = []
    for k, (sname, s) in enumerate(agg.items()):
        for m, stats in s["methods"].items():
            if stats["macro"]["mean"] is None:
                continue
            x = stats["trainable_parameters"] or zero_x
            y = 100 * stats["macro"]["mean"]
            several = (stats["macro"].get("n") or 0) > 1
            ax.errorbar([x], [y], yerr=[100 * stats["macro"]["std"]] if several else None,
                        fmt=markers[k % len(markers)], color=colors[m], capsize=3 if several else 0, markersize=6)
            points.append((x, y, m if len(agg) == 1 else f"{m} ({sname})", colors[m]))
    ax.set_xscale("log")
    hi = max(positive or [zero_x])
    ax.set_xlim(zero_x / 2, hi * 6)  # room on the right for the labels
    ys = [p[1] for p in points] or [0.0]
    pad = max(2.0, 0.15 * (max(ys) - min(ys)))
    ax.set_ylim(min(ys) - pad, max(ys) + pad)
    ticks = [t for t in ax.get_xticks() if zero_x * 1.5 < t < hi * 6]
    ax.set_xticks(([zero_x] if any(not c for c in counts) else []) + ticks)
    ax.set_xticklabels((["0"] if any(not c for c in counts) else []) + [human_count(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("trainable parameters (log scale; 0 = the untrained model)")
    ax.set_ylabel("macro score (%)")
    title = f"Macro score against trainable parameters ({seeds_phrase(seeds)})"
    if len(agg) > 1:
        title += "\nmarkers: " + ", ".join(f"{markers[k % len(markers)]} {name}" for k, name in enumerate(agg))
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    place_labels(ax, points)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_scaling(agg: dict[str, Any], path: Path, core_tasks: Sequence[str] = ()) -> Path:
    """Macro score vs number of tasks per method (and, with core tasks, the macro over the tasks every setting
    shares)."""
    plt = pyplot()
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
                    es.append(100 * (value["std"] or 0) if (value.get("n") or 0) > 1 else 0.0)
            if xs:
                ax.errorbar(xs, ys, yerr=es if any(es) else None, marker="o", color=colors[m], label=m,
                            capsize=3 if any(es) else 0)
        ax.set_xlabel("number of tasks")
        ax.set_ylabel("score (%)")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([agg[s]["num_tasks"] for s in names])
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()  # below the panels, never over a curve
    fig.legend(handles, labels, fontsize=8, ncol=min(6, len(labels)), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               frameon=False)
    seeds = max_seeds([st.get("macro") for s in names for st in agg[s]["methods"].values()])
    fig.suptitle(f"Macro score (%) against the number of tasks: does a method degrade as tasks are added? "
                 f"({seeds_phrase(seeds)})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
