"""Align-LoRA's align weight on the demo mixture: summarize runs ``RUNS/w{weight}-s{seed}`` (each trained with
``mtpeft train`` and analyzed with ``mtpeft analyze --diagnostics alignment --out RUN/analysis``) into a table,
a JSON file and plots (commands in ``benchmarks/results/align-lora-weight/README.md``).

    python benchmarks/align_lora_weight.py --runs /tmp/alignexp --out benchmarks/results/align-lora-weight

Per run: the diagnostic's inter-task MMD, mean-distance ratio and z rms (means over layers and task pairs), the
per-task scores and the macro score. Per weight: mean +- std over seeds, and the paired difference from weight 0
of the same seed (the same eval items), with the discordant items (right at this weight and wrong at 0, and the
reverse) summed over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

RUN_NAME = re.compile(r"^w(?P<weight>[0-9.]+)-s(?P<seed>\d+)$")


def load_run(folder: Path) -> dict[str, Any]:
    """Scores, per-item correctness and the alignment summary of one run folder."""
    metrics = json.loads((folder / "eval" / "metrics.json").read_text())
    primary = metrics["primary"]
    scores = {t: 100 * m[primary[t]] for t, m in metrics["tasks"].items()}
    items = {}
    for line in (folder / "eval" / "predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        items[(row["task"], row["prompt"])] = float(row["score"])
    diag = json.loads((folder / "analysis" / "alignment.json").read_text())["data"]
    return {"scores": scores, "macro": 100 * metrics["macro"], "items": items, "alignment": diag["summary"],
            "per_layer_mmd": [e["mmd"] for e in diag["layers"]],
            "per_layer_ratio": [e["mean_distance_ratio"] for e in diag["layers"]]}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values: list[float], digits: int = 2) -> str:
    """``mean +- std (n)`` or the single value."""
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f} (n={len(values)})"


def summarize(runs_dir: Path) -> dict[str, Any]:
    """All runs by weight and seed, with the per-weight aggregates."""
    runs: dict[float, dict[int, dict[str, Any]]] = {}
    for folder in sorted(runs_dir.iterdir()):
        match = RUN_NAME.match(folder.name)
        if match and (folder / "analysis" / "alignment.json").is_file():
            runs.setdefault(float(match["weight"]), {})[int(match["seed"])] = load_run(folder)
    table = []
    for weight in sorted(runs):
        by_seed = runs[weight]
        seeds = sorted(by_seed)
        entry: dict[str, Any] = {"weight": weight, "seeds": seeds}
        for key in ("mmd", "mean_distance_ratio", "within_mmd", "z_rms"):
            entry[key] = [by_seed[s]["alignment"][key] for s in seeds]
        entry["macro"] = [by_seed[s]["macro"] for s in seeds]
        entry["tasks"] = {t: [by_seed[s]["scores"][t] for s in seeds] for t in by_seed[seeds[0]]["scores"]}
        paired, better, worse = [], 0, 0
        for s in seeds:
            base = runs.get(0.0, {}).get(s)
            if base is None or weight == 0.0:
                continue
            paired.append(by_seed[s]["macro"] - base["macro"])
            shared = set(base["items"]) & set(by_seed[s]["items"])
            better += sum(by_seed[s]["items"][k] > base["items"][k] for k in shared)
            worse += sum(by_seed[s]["items"][k] < base["items"][k] for k in shared)
        entry["paired_macro_diff"] = paired
        entry["items_better_worse"] = [better, worse]
        table.append(entry)
    return {"runs": {str(w): {str(s): {k: v for k, v in r.items() if k != "items"} for s, r in by_seed.items()}
                     for w, by_seed in runs.items()}, "table": table}


def markdown(summary: dict[str, Any]) -> str:
    """The result table as Markdown."""
    header = ["align weight", "seeds", "inter-task MMD", "within-task MMD", "mean-distance ratio", "z rms",
              "macro % per seed", "macro % mean ± std", "macro diff vs w=0 (paired)", "items better / worse"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in summary["table"]:
        per_seed = ", ".join(f"{v:.1f}" for v in e["macro"])
        diff = fmt(e["paired_macro_diff"], 1) if e["paired_macro_diff"] else "-"
        items = "-" if e["weight"] == 0.0 else f"{e['items_better_worse'][0]} / {e['items_better_worse'][1]}"
        lines.append(f"| {e['weight']:g} | {','.join(map(str, e['seeds']))} | {fmt(e['mmd'], 3)} | "
                     f"{fmt(e['within_mmd'], 3)} | {fmt(e['mean_distance_ratio'], 3)} | {fmt(e['z_rms'], 3)} | "
                     f"{per_seed} | {fmt(e['macro'], 1)} | {diff} | {items} |")
    tasks = list(summary["table"][0]["tasks"]) if summary["table"] else []
    lines += ["", "| align weight | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for e in summary["table"]:
        lines.append(f"| {e['weight']:g} | " + " | ".join(fmt(e["tasks"][t], 1) for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], out: Path) -> list[Path]:
    """``weights.png`` (alignment numbers and macro score against the weight) and ``per_layer.png`` (seed 0's
    per-layer MMD and ratio, one line per weight)."""
    from mtpeft.plotting import pyplot

    plt = pyplot()
    table = summary["table"]
    # weight 0 has no place on a log axis: it is drawn one decade left of the smallest weight, labelled 0
    positive = [e["weight"] for e in table if e["weight"] > 0]
    zero_at = min(positive) / 10 if positive else 1e-3
    xs = [e["weight"] or zero_at for e in table]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, label in ((axes[0], "mmd", "inter-task MMD^2 (mean over layers, pairs)"),
                           (axes[1], "mean_distance_ratio", "mean-distance ratio"),
                           (axes[2], "macro", "macro score %")):
        means = [mean_std(e[key])[0] for e in table]
        stds = [mean_std(e[key])[1] for e in table]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=4, label="inter-task (mean over pairs)")
        for x, e in zip(xs, table):
            ax.scatter([x] * len(e[key]), e[key], color="gray", s=12, zorder=3)
        if key == "mmd":
            ax.errorbar(xs, [mean_std(e["within_mmd"])[0] for e in table], marker=".", ls="--", color="gray",
                        label="within-task (split halves)")
            ax.legend(fontsize=8)
        ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{e['weight']:g}" for e in table])
        ax.set_xlabel("align_weight (MMD)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle("Align-LoRA on the demo mixture (SmolLM2-135M, 80 steps): mean ± std over seeds, dots = seeds")
    fig.tight_layout()
    first = out / "weights.png"
    fig.savefig(first, dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.2))
    for weight, by_seed in sorted(summary["runs"].items(), key=lambda kv: float(kv[0])):
        run = by_seed.get("0")
        if run is None:
            continue
        axes[0].plot(run["per_layer_mmd"], marker=".", lw=1, label=f"w={float(weight):g}")
        axes[1].plot(run["per_layer_ratio"], marker=".", lw=1, label=f"w={float(weight):g}")
    for ax, label in ((axes[0], "inter-task MMD^2 per adapted layer"),
                      (axes[1], "mean-distance ratio per adapted layer")):
        ax.set_xlabel("adapted layer (index: layers 20-29 x q,k,v,o,gate,up,down)")
        ax.set_title(f"{label} (seed 0)", fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    second = out / "per_layer.png"
    fig.savefig(second, dpi=110)
    plt.close(fig)
    return [first, second]


def main(argv: list[str] | None = None) -> int:
    """Summarize the runs; prints the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", required=True, type=Path, help="Folder holding the w{weight}-s{seed} run folders.")
    p.add_argument("--out", required=True, type=Path, help="Where summary.json, table.md and the plots go.")
    args = p.parse_args(argv)
    summary = summarize(args.runs)
    if not summary["table"]:
        raise SystemExit(f"no analyzed runs (w<weight>-s<seed>/analysis/alignment.json) under {args.runs}")
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(summary)
    (args.out / "table.md").write_text(text, encoding="utf-8")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=True) + "\n", encoding="utf-8")
    plot(summary, args.out)
    print(text)
    return 0 if all(not math.isnan(v) for e in summary["table"] for v in e["mmd"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
