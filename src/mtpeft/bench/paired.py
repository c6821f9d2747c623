"""Paired comparisons of two methods on the same test items and seeds, and the one-sentence recommendation.

Every run records each task's per-item scores (``tasks[<task>]["items"]``: the primary metric of every test
example, in the task's eval order). Two methods of the same setting saw the same items with the same seeds, so
their difference is measured item by item: for each task ``t`` and item ``i`` the difference ``d_ti`` is averaged
over the seeds both methods ran; the macro difference is ``mean_t mean_i d_ti`` and its standard error is
``sqrt(sum_t s_t^2 / n_t) / T`` (``s_t`` the sample std of task ``t``'s item differences, ``n_t`` its items), with
a Student-t interval on ``sum_t (n_t - 1)`` degrees of freedom (a stratified paired t-interval). A difference is
*beyond noise* when its 95% interval excludes 0.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: The confidence level of every interval in the report.
LEVEL = 0.95
#: Methods that are never recommended: the base model without adapters, and PEFT's LoRA (the same method as
#: ``lora``, run as a check on its implementation).
NOT_RECOMMENDED: tuple[str, ...] = ("untrained", "peft_lora")


@dataclass
class PairedDifference:
    """``method`` minus ``reference`` in macro score (fractions), with its confidence interval.

    Attributes:
        method, reference: the two methods.
        diff: the macro difference (method - reference).
        low, high: the ``LEVEL`` confidence interval of ``diff``.
        items: the number of paired test items (over all tasks).
        seeds: the seeds both methods ran.
    """

    method: str
    reference: str
    diff: float
    low: float
    high: float
    items: int
    seeds: list[int]

    @property
    def beyond_noise(self) -> bool:
        """Whether the interval excludes 0."""
        return self.low > 0 or self.high < 0


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (exact for df 1 and 2; else the
    Cornish-Fisher expansion of Abramowitz & Stegun 26.7.5, within 0.01 of the table from df 3)."""
    if df <= 0:
        return math.inf
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = statistics.NormalDist().inv_cdf(p)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def paired_interval(diffs_per_task: Sequence[Sequence[float]], level: float = LEVEL) -> tuple[float, float, float]:
    """(macro difference, low, high) from each task's per-item differences (a stratified paired t-interval).

    A task with one item adds no variance estimate; with no degrees of freedom at all the interval is
    (-inf, inf).
    """
    tasks = [list(d) for d in diffs_per_task if len(d)]
    if not tasks:
        raise ValueError("no paired items")
    diff = statistics.fmean(statistics.fmean(d) for d in tasks)
    var = sum(statistics.variance(d) / len(d) for d in tasks if len(d) > 1) / len(tasks) ** 2
    df = sum(len(d) - 1 for d in tasks)
    if df == 0:
        return diff, -math.inf, math.inf
    half = t_quantile(0.5 + level / 2, df) * math.sqrt(var)
    return diff, diff - half, diff + half


def _items_by_seed(runs: Sequence[dict[str, Any]], task: str) -> dict[int, list[float]]:
    out = {}
    for run in runs:
        items = ((run.get("tasks") or {}).get(task) or {}).get("items")
        if items is not None:
            out[int(run["seed"])] = [float(x) for x in items]
    return out


def compare(
    method: str,
    reference: str,
    runs: dict[str, Sequence[dict[str, Any]]],
    tasks: Sequence[str],
    level: float = LEVEL,
) -> PairedDifference | None:
    """``method`` against ``reference`` over the seeds both ran, paired per test item; None when they share no
    seed with per-item scores, or a task's items differ in number."""
    per_task: list[list[float]] = []
    seeds_used: set[int] = set()
    for task in tasks:
        a, b = _items_by_seed(runs.get(method, []), task), _items_by_seed(runs.get(reference, []), task)
        seeds = sorted(set(a) & set(b))
        if not seeds or any(len(a[s]) != len(b[s]) or len(a[s]) != len(a[seeds[0]]) for s in seeds):
            return None
        seeds_used.update(seeds)
        n = len(a[seeds[0]])
        per_task.append([statistics.fmean(a[s][i] - b[s][i] for s in seeds) for i in range(n)])
    if not per_task or not any(per_task):
        return None
    diff, low, high = paired_interval(per_task, level)
    return PairedDifference(method, reference, diff, low, high, sum(map(len, per_task)), sorted(seeds_used))


def comparisons(
    runs: dict[str, Sequence[dict[str, Any]]],
    tasks: Sequence[str],
    references: Sequence[str] = ("lora", "single_task_lora"),
) -> dict[str, dict[str, PairedDifference | None]]:
    """``{reference: {method: difference}}`` for every reference present and every other method."""
    out: dict[str, dict[str, PairedDifference | None]] = {}
    for ref in references:
        if ref in runs:
            out[ref] = {m: compare(m, ref, runs, tasks) for m in runs if m != ref}
    return out


def recommendation(macro: dict[str, float | None], against_lora: dict[str, PairedDifference | None] | None) -> str:
    """One sentence: the best-scoring method whose macro score is significantly ahead of plain LoRA, or that
    plain LoRA is as good here."""
    if against_lora is None:
        return "No recommendation: plain LoRA was not run, and the methods are compared against it."
    ahead = [
        (macro.get(m) or 0.0, m, d)
        for m, d in against_lora.items()
        if d is not None and d.low > 0 and m not in NOT_RECOMMENDED
    ]
    if not ahead:
        if not any(d is not None for d in against_lora.values()):
            return "No recommendation: the runs hold no per-item scores to compare (rerun with this mtpeft)."
        return (
            f"plain LoRA is as good here: no method is ahead of it beyond noise ({100 * LEVEL:.0f}% paired "
            "intervals over the same test items and seeds)."
        )
    _, best, d = max(ahead, key=lambda x: x[0])
    return (
        f"Use {best}: it is ahead of plain LoRA by {100 * d.diff:+.1f} points macro "
        f"({100 * LEVEL:.0f}% CI {100 * d.low:+.1f} to {100 * d.high:+.1f}, {d.items} paired items, "
        f"{len(d.seeds)} seed{'s' if len(d.seeds) != 1 else ''})."
    )
