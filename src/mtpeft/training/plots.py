"""A run's pictures, drawn from its ``metrics.jsonl`` at the end of training (matplotlib's Agg backend).

* ``plots/loss.png``: the total training loss, each task's loss (``task_loss/<task>``) and the auxiliary losses
  (``aux/<name>``, unweighted) against the step, one panel each.
* ``plots/scores.png`` (with ``train.eval_every``, or scores before and after training): each task's score and
  the macro average against the step; the scores before training sit at step 0, the final ones at the last step.

Drawing never fails a run: a problem is reported as a warning and the run goes on.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..plotting import pyplot
from .task_losses import TASK_LOSS_PREFIX

#: The key prefix of per-task scores in a metrics record written by an evaluation during training.
EVAL_PREFIX = "eval/"


def eval_scores(result: Any) -> dict[str, float]:
    """``{"eval/<task>": primary score}`` of an EvalResult (for the metrics record of an evaluation)."""
    return {f"{EVAL_PREFIX}{t}": float(result.score(t)) for t in result.primary}


def eval_record(step: int, result: Any) -> dict[str, Any]:
    """The metrics record of an evaluation during training: the macro and micro scores and each task's."""
    return {"step": step, "eval_macro": result.macro, "eval_micro": result.micro, **eval_scores(result)}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (lines that are not JSON objects are skipped)."""
    records = []
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
    return records


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def _integer_steps(ax: Any) -> None:
    """Whole optimizer steps on the x axis."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend(ax: Any, n: int) -> None:
    if n > 8:  # many tasks: beside the panel, not over the curves
        ax.legend(fontsize=6, ncol=max(1, math.ceil(n / 18)), loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  frameon=False)
    elif n:
        ax.legend(fontsize=7)


def plot_losses(records: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """``loss.png``: total loss, per-task losses and auxiliary losses against the step; None without losses."""
    train = [r for r in records if "loss" in r]
    if not train:
        return None
    keys = sorted({k for r in train for k in r})
    tasks = [k for k in keys if k.startswith(TASK_LOSS_PREFIX)]
    aux = [k for k in keys if k.startswith("aux/")]
    panels = [("total training loss", ["loss"])]
    if tasks:
        panels.append(("loss per task (token mean over its rows)", tasks))
    if aux:
        panels.append(("auxiliary losses (unweighted)", aux))
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + (1.5 if len(tasks) > 8 else 0), 4),
                             squeeze=False)
    for ax, (name, series) in zip(axes[0], panels):
        for key in series:
            xs, ys = _series(train, key)
            label = key.split("/", 1)[-1] if "/" in key else None
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, lw=1.2, label=label)
        ax.set_title(name, fontsize=10)
        _integer_steps(ax)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if series != ["loss"]:
            _legend(ax, len(series))
    fig.suptitle(f"Training losses{f' of {title}' if title else ''}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_scores(points: Sequence[tuple[int, dict[str, float]]], path: Path, title: str = "") -> Path | None:
    """``scores.png``: each task's score (%) and the macro average against the step; None with fewer than two
    evaluations."""
    points = sorted(points, key=lambda p: p[0])
    if len(points) < 2:
        return None
    tasks = sorted({t for _, scores in points for t in scores})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5 + (1.5 if len(tasks) > 8 else 0), 4.5))
    for t in tasks:
        xs = [s for s, scores in points if t in scores]
        ax.plot(xs, [100 * scores[t] for _, scores in points if t in scores], marker="o", ms=3, lw=1, label=t)
    macro = [(s, 100 * sum(v.values()) / len(v)) for s, v in points if v]
    ax.plot([s for s, _ in macro], [m for _, m in macro], color="black", lw=2, ls="--", marker="o", alpha=0.8,
            label="macro")
    _integer_steps(ax)
    top = max([100 * v for _, scores in points for v in scores.values()] + [10.0])
    ax.set_ylim(-2, min(102, top * 1.1 + 2))
    ax.set_xlabel("optimizer step (0 = before training)")
    ax.set_ylabel("score (%)")
    ax.set_title(f"Evaluation scores per task during training{f' ({title})' if title else ''}", fontsize=11)
    ax.grid(alpha=0.3)
    _legend(ax, len(tasks) + 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_run_plots(
    run_dir: str | Path, final: Any = None, before: Any = None, steps: int | None = None, title: str = ""
) -> dict[str, Path]:
    """Draw ``plots/loss.png`` and (with evaluations during training) ``plots/scores.png`` for a run folder.

    ``final``/``before``: the EvalResults after and before training (added to the score curves at the last
    step and at step 0). Returns the plots written; a failure is a warning, never an error.
    """
    run_dir = Path(run_dir)
    try:
        records = read_metrics(run_dir / "metrics.jsonl")
        points = [(int(r["step"]), {k[len(EVAL_PREFIX):]: float(v) for k, v in r.items() if k.startswith(EVAL_PREFIX)})
                  for r in records if any(k.startswith(EVAL_PREFIX) for k in r)]
        if points and before is not None:
            points.append((0, {t: float(before.score(t)) for t in before.primary}))
        if points and final is not None and steps is not None:
            points.append((int(steps), {t: float(final.score(t)) for t in final.primary}))
        folder = run_dir / "plots"
        folder.mkdir(parents=True, exist_ok=True)
        written = {"loss": plot_losses(records, folder / "loss.png", title),
                   "scores": plot_scores(points, folder / "scores.png", title)}
        return {k: v for k, v in written.items() if v is not None}
    except Exception as exc:  # a picture is never worth a failed run
        warnings.warn(f"could not draw the run plots in {run_dir / 'plots'}: {type(exc).__name__}: {exc}",
                      stacklevel=2)
        return {}
