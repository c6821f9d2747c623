"""The benchmark report: Markdown tables (mean and std over seeds, per task and averaged) and PNG plots.

:func:`write_report` reads every ``runs/**/result.json`` of a bench folder and writes ``report.md``,
``report.json`` (the aggregates) and ``plots/``: a per-task grouped bar chart per setting, the score against
trainable parameters, and for suites with several settings (``bbh-scaling``) the macro score against the
number of tasks per method. Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .runner import BASELINES, DEFAULT_METHODS, ERROR_NAME, RESULT_NAME


def load_results(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every finished run's result record under ``out_dir/runs`` (sorted by setting, method, seed)."""
    runs = Path(out_dir) / "runs"
    found = [json.loads(p.read_text()) for p in sorted(runs.glob(f"*/*/seed-*/{RESULT_NAME}"))]
    return sorted(found, key=lambda r: (r["setting"], r["method"], r["seed"]))


def load_errors(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The failed runs (``error.json`` without a ``result.json`` beside it)."""
    runs = Path(out_dir) / "runs"
    return [
        json.loads(p.read_text())
        for p in sorted(runs.glob(f"*/*/seed-*/{ERROR_NAME}"))
        if not (p.parent / RESULT_NAME).exists()
    ]


def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean", "std", "n"}`` over the non-missing values (std: sample standard deviation; 0 for one value;
    None when there is no value)."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "n": len(vals),
    }


def _method_order(methods: Sequence[str], preferred: Sequence[str] = ()) -> list[str]:
    order = [*BASELINES, *preferred, *DEFAULT_METHODS]
    rank = {m: i for i, m in enumerate(dict.fromkeys(order))}
    return sorted(set(methods), key=lambda m: (rank.get(m, len(rank)), m))


def aggregate(
    results: Sequence[dict[str, Any]], core_tasks: Sequence[str] = (), method_order: Sequence[str] = ()
) -> dict[str, Any]:
    """Aggregate runs over seeds: ``{setting: {"tasks": [...], "methods": {method: stats}}}``.

    A method's stats: ``seeds``, per-task ``tasks`` (mean/std of the primary metric), ``macro``, ``micro``,
    ``core_macro`` (over ``core_tasks``), ``unseen`` and ``unseen_macro``, and the means of
    ``trainable_parameters``, ``wall_time_s`` and ``cpu_time_s``, the maxima of the peak memories. Macro and micro are
    computed per seed, then averaged.
    """
    settings: dict[str, Any] = {}
    for r in results:
        s = settings.setdefault(r["setting"], {"tasks": [], "unseen_tasks": [], "metrics": {}, "runs": {}})
        for t, v in r["tasks"].items():
            if t not in s["tasks"]:
                s["tasks"].append(t)
            s["metrics"].setdefault(t, v.get("metric"))
        for t in r.get("unseen") or {}:
            if t not in s["unseen_tasks"]:
                s["unseen_tasks"].append(t)
        s["runs"].setdefault(r["method"], []).append(r)
    out: dict[str, Any] = {}
    for name, s in settings.items():
        methods = {}
        for method in _method_order(list(s["runs"]), method_order):
            runs = s["runs"][method]

            def score(run: dict[str, Any], task: str, key: str = "tasks") -> float | None:
                entry = (run.get(key) or {}).get(task)
                return None if entry is None else entry["score"]

            core = [t for t in core_tasks if t in s["tasks"]]
            mem_cpu = [r["peak_memory"].get("cpu_max_rss_mb") for r in runs if r.get("peak_memory")]
            mem_gpu = [r["peak_memory"].get("gpu_max_allocated_mb") for r in runs if r.get("peak_memory")]
            methods[method] = {
                "seeds": sorted(r["seed"] for r in runs),
                "tasks": {t: mean_std([score(r, t) for r in runs]) for t in s["tasks"]},
                "unseen": {t: mean_std([score(r, t, "unseen") for r in runs]) for t in s["unseen_tasks"]},
                "macro": mean_std([r.get("macro") for r in runs]),
                "micro": mean_std([r.get("micro") for r in runs]),
                "core_macro": mean_std([_mean([score(r, t) for t in core]) for r in runs]) if core else None,
                "unseen_macro": mean_std([r.get("unseen_macro") for r in runs]),
                "unseen_how": runs[0].get("unseen_how", ""),
                "trainable_parameters": mean_std([r.get("trainable_parameters") for r in runs])["mean"],
                "rank": runs[0].get("rank"),
                "steps": runs[0].get("steps"),
                "wall_time_s": mean_std([r.get("wall_time_s") for r in runs]),
                "cpu_time_s": mean_std([r.get("cpu_time_s") for r in runs]),
                "peak_cpu_rss_mb": max([m for m in mem_cpu if m is not None], default=None),
                "peak_gpu_mb": max([m for m in mem_gpu if m is not None], default=None),
                "notes": runs[0].get("notes", []),
            }
        out[name] = {
            "tasks": s["tasks"],
            "unseen_tasks": s["unseen_tasks"],
            "metrics": s["metrics"],
            "num_tasks": len(s["tasks"]),
            "methods": methods,
        }
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


# --------------------------------------------------------------------------------------------- tables
def fmt_pct(stat: dict[str, Any] | None) -> str:
    """``"31.2 ± 1.4"`` (percent; the std only with more than one seed), ``"-"`` when missing."""
    if not stat or stat.get("mean") is None:
        return "-"
    text = f"{100 * stat['mean']:.1f}"
    if stat.get("n", 0) > 1:
        text += f" ± {100 * stat['std']:.1f}"
    return text


def _fmt_int(x: float | None) -> str:
    return "-" if x is None else f"{int(round(x)):,}"


def _fmt_num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_table(setting: dict[str, Any]) -> str:
    """One row per method: seeds, trainable parameters, macro, micro, (core, unseen), time, memory."""
    has_core = any(m.get("core_macro") for m in setting["methods"].values())
    has_unseen = bool(setting["unseen_tasks"])
    header = ["method", "seeds", "trainable params", "macro %", "micro %"]
    header += ["core-tasks macro %"] if has_core else []
    header += ["unseen macro %"] if has_unseen else []
    header += ["wall time (min)", "CPU time (min)", "peak RSS (MiB)", "peak GPU (MiB)"]
    rows = []
    for method, m in setting["methods"].items():
        wall = m["wall_time_s"]["mean"]
        cpu = (m.get("cpu_time_s") or {}).get("mean")
        row = [
            method,
            str(len(m["seeds"])),
            _fmt_int(m["trainable_parameters"]),
            fmt_pct(m["macro"]),
            fmt_pct(m["micro"]),
        ]
        row += [fmt_pct(m.get("core_macro"))] if has_core else []
        row += [fmt_pct(m["unseen_macro"])] if has_unseen else []
        row += [
            _fmt_num(None if wall is None else wall / 60, 2),
            _fmt_num(None if cpu is None else cpu / 60, 2),
            _fmt_num(m["peak_cpu_rss_mb"], 0),
            _fmt_num(m["peak_gpu_mb"], 0),
        ]
        rows.append(row)
    return _md_table(header, rows)


def per_task_table(setting: dict[str, Any]) -> str:
    """Tasks as rows, methods as columns (score %, mean ± std over seeds), macro row; unseen tasks marked."""
    methods = list(setting["methods"])
    header = ["task", "metric", *methods]
    rows = []
    for t in setting["tasks"]:
        rows.append(
            [
                t,
                setting["metrics"].get(t) or "-",
                *[fmt_pct(setting["methods"][m]["tasks"].get(t)) for m in methods],
            ]
        )
    rows.append(["**macro**", "-", *[fmt_pct(setting["methods"][m]["macro"]) for m in methods]])
    for t in setting["unseen_tasks"]:
        rows.append([f"{t} (unseen)", "-", *[fmt_pct(setting["methods"][m]["unseen"].get(t)) for m in methods]])
    if setting["unseen_tasks"]:
        rows.append(["**unseen macro**", "-", *[fmt_pct(setting["methods"][m]["unseen_macro"]) for m in methods]])
    return _md_table(header, rows)


def scaling_table(agg: dict[str, Any], settings: Sequence[str], core: bool = False) -> str:
    """Methods as rows, settings (by number of tasks) as columns: macro % (or core-tasks macro %)."""
    names = sorted(settings, key=lambda s: agg[s]["num_tasks"])
    methods = _method_order({m for s in names for m in agg[s]["methods"]})
    header = ["method", *[f"{agg[s]['num_tasks']} tasks" for s in names]]
    rows = []
    for method in methods:
        cells = []
        for s in names:
            m = agg[s]["methods"].get(method)
            cells.append(fmt_pct(None if m is None else (m.get("core_macro") if core else m["macro"])))
        rows.append([method, *cells])
    return _md_table(header, rows)


# ---------------------------------------------------------------------------------------------- plots
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
    methods = _method_order({m for s in agg.values() for m in s["methods"]})
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
    methods = _method_order({m for s in names for m in agg[s]["methods"]})
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


# --------------------------------------------------------------------------------------------- report
def _provenance(bench: dict[str, Any], results: Sequence[dict[str, Any]]) -> list[str]:
    versions = bench.get("versions") or (results[0].get("versions") if results else {}) or {}
    git = bench.get("git") or (results[0].get("git") if results else {}) or {}
    device = results[0].get("device", {}) if results else {}
    lines = ["- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())] if versions else []
    if git.get("revision"):
        lines.append(f"- git: {git['revision'][:12]}{' (dirty: uncommitted changes)' if git.get('dirty') else ''}")
    if device:
        lines.append(
            f"- device: {device.get('gpu') or 'CPU'}, {device.get('cpu_count')} CPUs, "
            f"{device.get('torch_threads')} torch threads"
        )
    return lines


def render_markdown(
    out_dir: Path,
    agg: dict[str, Any],
    bench: dict[str, Any],
    results: Sequence[dict[str, Any]],
    errors: Sequence[dict[str, Any]],
    plots: dict[str, str],
) -> str:
    """The text of report.md."""
    opts = bench.get("options", {})
    title = f"# Benchmark: {bench.get('suite', 'unknown')}{' (quick)' if bench.get('quick') else ''}"
    lines = [title, "", bench.get("description", ""), ""]
    lines += [f"- folder: `{out_dir}`", f"- finished runs: {len(results)}; failed: {len(errors)}"]
    if bench.get("updated"):
        lines.append(f"- last invocation: {bench['updated']}")
    lines += _provenance(bench, results)
    lines += [
        "",
        "Every method sees the same data, mixing, steps, batch size, learning rate, schedule and "
        "evaluation; only the method section differs (alpha = 2 r everywhere). Scores are the tasks' "
        "primary metrics in percent, mean ± sample std over seeds; macro and micro are computed per seed "
        "and then averaged. The untrained model is deterministic and runs once.",
    ]
    if opts.get("param_budget"):
        lines.append(
            f"Parameter budget: {opts['param_budget']:,} trainable parameters; each method's rank was "
            "chosen so that its count comes closest (single-task LoRA: budget / T per adapter)."
        )
    if any(r["method"] == "single_task_lora" for r in results):
        policy = opts.get("single_task_steps", "split")
        lines.append(
            "single_task_lora: one LoRA per task trained on that task only, "
            + (
                "ceil(steps / T) steps each (the same total steps as one multi-task run)"
                if policy == "split"
                else "the full steps each (T times the compute)"
            )
            + "; each task is evaluated with its own adapter."
        )
    for sname, s in agg.items():
        steps = next((x.get("steps") for x in bench.get("settings", []) if x["name"] == sname), None)
        lines += [
            "",
            f"## Setting `{sname}` ({s['num_tasks']} tasks{f', {steps} steps' if steps else ''})",
            "",
            "### Summary",
            "",
            summary_table(s),
            "",
            "### Per task (score %)",
            "",
            per_task_table(s),
        ]
        if s["unseen_tasks"]:
            lines += [
                "",
                f"Unseen tasks (policy `{opts.get('unseen_policy', 'auto')}`): "
                + "; ".join(f"{m}: {st['unseen_how'] or '-'}" for m, st in s["methods"].items()),
            ]
        if f"per_task_{sname}" in plots:
            lines += ["", f"![per-task scores]({plots[f'per_task_{sname}']})"]
    if len(agg) > 1:
        names = list(agg)
        lines += ["", "## Scaling: macro % against the number of tasks", "", scaling_table(agg, names)]
        if bench.get("core_tasks"):
            lines += [
                "",
                f"Macro % over the {len(bench['core_tasks'])} tasks every setting shares "
                f"({', '.join(bench['core_tasks'])}):",
                "",
                scaling_table(agg, names, core=True),
            ]
        if "scaling" in plots:
            lines += ["", f"![scaling]({plots['scaling']})"]
    if "score_vs_params" in plots:
        lines += [
            "",
            "## Score against trainable parameters",
            "",
            f"![score vs params]({plots['score_vs_params']})",
        ]
    notes = sorted({f"{r['method']}: {n}" for r in results for n in r.get("notes", [])})
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    if errors:
        lines += ["", "## Failed runs (rerun the same command to retry them)", ""]
        lines += [f"- {e['setting']}/{e['method']}/seed-{e['seed']}: {e['error']}" for e in errors]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | os.PathLike, *, plots: bool = True) -> dict[str, Any]:
    """Write ``report.md``, ``report.json`` and ``plots/*.png`` for the bench folder; returns their paths."""
    out = Path(out_dir)
    bench_file = out / "bench.json"
    bench = json.loads(bench_file.read_text()) if bench_file.is_file() else {}
    results = load_results(out)
    errors = load_errors(out)
    if not results and not errors:
        raise FileNotFoundError(
            f"{out} holds no benchmark results (expected runs/<setting>/<method>/seed-<k>/{RESULT_NAME})"
        )
    preferred = bench.get("options", {}).get("methods", [])
    agg = aggregate(results, bench.get("core_tasks", []), preferred)
    written: dict[str, str] = {}
    if plots and agg:
        folder = out / "plots"
        folder.mkdir(parents=True, exist_ok=True)
        for sname, s in agg.items():
            p = plot_per_task(sname, s, folder / f"per_task_{sname}.png")
            written[f"per_task_{sname}"] = str(p.relative_to(out))
        written["score_vs_params"] = str(plot_score_vs_params(agg, folder / "score_vs_params.png").relative_to(out))
        if len(agg) > 1:
            written["scaling"] = str(
                plot_scaling(agg, folder / "scaling.png", bench.get("core_tasks", [])).relative_to(out)
            )
    md = render_markdown(out, agg, bench, results, errors, written)
    (out / "report.md").write_text(md, encoding="utf-8")
    (out / "report.json").write_text(
        json.dumps(
            {
                "suite": bench.get("suite"),
                "settings": agg,
                "failed": [{k: e.get(k) for k in ("setting", "method", "seed", "error")} for e in errors],
            },
            indent=2,
            default=str,
        )
        + "\n",
        encoding="utf-8",
    )
    return {
        "markdown": str(out / "report.md"),
        "json": str(out / "report.json"),
        "plots": {k: str(out / v) for k, v in written.items()},
    }
