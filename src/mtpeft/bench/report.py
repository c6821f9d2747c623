"""The benchmark report: Markdown tables (mean and std over seeds, per task and averaged) and PNG plots.

:func:`write_report` reads every ``runs/**/result.json`` of a bench folder and writes ``report.md``,
``report.json`` (the aggregates) and ``plots/`` (drawn by :mod:`mtpeft.bench.plots`): a per-task grouped bar
chart per setting, the score against trainable parameters, and for suites with several settings
(``bbh-scaling``) the macro score against the number of tasks per method.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..tables import markdown_table
from .layout import BENCH_NAME, RESULT_NAME, load_errors, load_results
from .options import method_order as ordered_methods
from .plots import plot_per_task, plot_scaling, plot_score_vs_params
from .ranking import public, rank_setting, ranking_lines


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
        for method in ordered_methods(list(s["runs"]), method_order):
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
    return markdown_table(header, rows)


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
    return markdown_table(header, rows)


def scaling_table(agg: dict[str, Any], settings: Sequence[str], core: bool = False) -> str:
    """Methods as rows, settings (by number of tasks) as columns: macro % (or core-tasks macro %)."""
    names = sorted(settings, key=lambda s: agg[s]["num_tasks"])
    methods = ordered_methods({m for s in names for m in agg[s]["methods"]})
    header = ["method", *[f"{agg[s]['num_tasks']} tasks" for s in names]]
    rows = []
    for method in methods:
        cells = []
        for s in names:
            m = agg[s]["methods"].get(method)
            cells.append(fmt_pct(None if m is None else (m.get("core_macro") if core else m["macro"])))
        rows.append([method, *cells])
    return markdown_table(header, rows)


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
    ranked: dict[str, Any] | None = None,
) -> str:
    """The text of report.md (``ranked``: :func:`~mtpeft.bench.ranking.rank_setting` per setting)."""
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
    if any(r["method"] == "peft_lora" for r in results):
        lines.append(
            "peft_lora: Hugging Face PEFT's LoRA (the lora run's config and batches, a plain PyTorch loop, the same "
            "evaluation): its paired difference from lora measures the two implementations' disagreement."
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
        if ranked and sname in ranked:
            lines += ["", *ranking_lines(s, ranked[sname])]
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
    bench_file = out / BENCH_NAME
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
    ranked = {name: rank_setting(s, [r for r in results if r["setting"] == name]) for name, s in agg.items()}
    md = render_markdown(out, agg, bench, results, errors, written, ranked)
    (out / "report.md").write_text(md, encoding="utf-8")
    (out / "report.json").write_text(
        json.dumps(
            {
                "suite": bench.get("suite"),
                "settings": agg,
                "ranking": {name: public(r) for name, r in ranked.items()},
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
