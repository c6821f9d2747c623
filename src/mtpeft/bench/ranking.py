"""The report's "which method for these tasks?" section: methods ranked by macro score, each compared with
plain LoRA and with single-task LoRA by paired confidence intervals (:mod:`mtpeft.bench.paired`), and a
one-sentence recommendation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..tables import markdown_table
from .paired import LEVEL, PairedDifference, comparisons, recommendation

REFERENCES: tuple[str, ...] = ("lora", "single_task_lora")


def _cell(d: PairedDifference | None) -> str:
    if d is None:
        return "-"
    mark = " **(beyond noise)**" if d.beyond_noise else ""
    return f"{100 * d.diff:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]{mark}"


def _record(d: PairedDifference | None) -> dict[str, Any] | None:
    if d is None:
        return None
    return {
        "diff": d.diff, "low": d.low, "high": d.high, "items": d.items, "seeds": d.seeds,
        "beyond_noise": d.beyond_noise,
    }


def rank_setting(setting: dict[str, Any], results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``{"order", "comparisons", "recommendation"}`` for one setting's aggregate and its result records."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        runs.setdefault(r["method"], []).append(r)
    macro = {m: st["macro"]["mean"] for m, st in setting["methods"].items()}
    order = sorted((m for m in macro if macro[m] is not None), key=lambda m: -macro[m])
    diffs = comparisons(runs, setting["tasks"], REFERENCES)
    return {
        "order": order,
        "comparisons": {ref: {m: _record(d) for m, d in per.items()} for ref, per in diffs.items()},
        "recommendation": recommendation(macro, diffs.get("lora")),
        "_diffs": diffs,
    }


def ranking_lines(setting: dict[str, Any], ranked: dict[str, Any]) -> list[str]:
    """The Markdown of the section for one setting."""
    diffs: dict[str, dict[str, PairedDifference | None]] = ranked["_diffs"]
    refs = [r for r in REFERENCES if r in diffs]
    header = ["rank", "method", "macro %", *[f"vs {r} (points, {100 * LEVEL:.0f}% CI)" for r in refs]]
    rows = []
    for i, m in enumerate(ranked["order"], 1):
        stat = setting["methods"][m]["macro"]
        cells = ["(reference)" if m == r else _cell(diffs[r].get(m)) for r in refs]
        rows.append([str(i), m, f"{100 * stat['mean']:.1f}", *cells])
    beyond = [
        f"{d.method} vs {d.reference} ({100 * d.diff:+.1f})"
        for r in refs
        for d in diffs[r].values()
        if d is not None and d.beyond_noise
    ]
    lines = [
        "### Which method for these tasks?",
        "",
        "Methods ranked by macro score. Each difference is paired over the same test items and seeds "
        f"(per-item score differences averaged over the shared seeds; a stratified t-interval, {100 * LEVEL:.0f}%); "
        "it is beyond noise when its interval excludes 0.",
        "",
        markdown_table(header, rows),
        "",
        "Beyond noise: " + ("; ".join(beyond) if beyond else "none of the differences") + ".",
        "",
        f"**Recommendation:** {ranked['recommendation']}",
    ]
    check = implementation_check(diffs.get("lora", {}).get("peft_lora"))
    if check:
        lines += ["", check]
    return lines


def implementation_check(d: PairedDifference | None) -> str | None:
    """The sentence on mtpeft's LoRA against Hugging Face PEFT's (the ``peft_lora`` baseline), None without it."""
    if d is None:
        return None
    verdict = "**beyond noise**: the two implementations disagree" if d.beyond_noise else "within noise"
    return (
        f"**mtpeft LoRA vs Hugging Face PEFT LoRA:** peft_lora - lora = {100 * d.diff:+.1f} points macro "
        f"({100 * LEVEL:.0f}% CI {100 * d.low:+.1f} to {100 * d.high:+.1f}, {d.items} paired items, "
        f"{len(d.seeds)} seed{'s' if len(d.seeds) != 1 else ''}): {verdict}."
    )


def public(ranked: dict[str, Any]) -> dict[str, Any]:
    """The JSON-friendly part of :func:`rank_setting`'s answer (for report.json)."""
    return {k: v for k, v in ranked.items() if not k.startswith("_")}
