"""Per-task evaluation results: :class:`EvalResult` (metrics, averages, files) and the before/after table."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..tables import markdown_table, text_table

__all__ = ["EvalResult", "compare_table"]


@dataclass
class EvalResult:
    """Evaluation results.

    Attributes:
        metrics: ``{task: {metric_name: value, ..., "n": count}}``; values are fractions (0.5 = 50%).
        primary: ``{task: metric_name}``, the metric that enters the averages.
        predictions: one dict per example: ``task``, ``prompt``, ``prediction``, ``reference``,
            ``correct`` (bool), ``score`` (the primary metric's per-example score), and for option
            scoring ``option_logprobs``.
    """

    metrics: dict[str, dict[str, float]]
    primary: dict[str, str]
    predictions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def macro(self) -> float:
        """Unweighted mean over tasks of each task's primary metric (a fraction; NaN without tasks)."""
        vals = [self.metrics[t][m] for t, m in self.primary.items()]
        return sum(vals) / len(vals) if vals else math.nan

    @property
    def micro(self) -> float:
        """Mean of the tasks' primary metrics weighted by their number of examples (NaN without tasks)."""
        total = sum(self.metrics[t]["n"] for t in self.primary)
        if not total:
            return math.nan
        return sum(self.metrics[t][m] * self.metrics[t]["n"] for t, m in self.primary.items()) / total

    def score(self, task: str) -> float:
        """The primary metric of ``task``."""
        return self.metrics[task][self.primary[task]]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict: ``tasks`` (the metrics), ``primary``, ``macro``, ``micro``."""
        return {"tasks": self.metrics, "primary": self.primary, "macro": self.macro, "micro": self.micro}

    @classmethod
    def from_dict(cls, data: dict[str, Any], predictions: list[dict[str, Any]] | None = None) -> EvalResult:
        """Inverse of :meth:`to_dict` (``macro``/``micro`` are recomputed)."""
        try:
            return cls(dict(data["tasks"]), dict(data["primary"]), list(predictions or []))
        except KeyError as exc:
            raise ValueError(f"not an EvalResult dict: missing key {exc}") from None

    def save(self, directory: str | Path, name: str = "metrics") -> Path:
        """Write ``metrics.json``, ``metrics.md`` (a Markdown table) and ``predictions.jsonl``.

        Another ``name`` (``"before"``: the scores before training) writes ``NAME.json``, ``NAME.md`` and
        ``NAME_predictions.jsonl`` beside them.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.json").write_text(
            json.dumps(self.to_dict(), indent=2, allow_nan=True) + "\n", encoding="utf-8"
        )
        (d / f"{name}.md").write_text(self.format_table(markdown=True) + "\n", encoding="utf-8")
        with (d / _predictions_file(name)).open("w", encoding="utf-8") as fh:
            for p in self.predictions:
                fh.write(json.dumps(p, ensure_ascii=False) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | Path, name: str = "metrics") -> EvalResult:
        """Read a result written by :meth:`save` (with the same ``name``)."""
        d = Path(directory)
        data = json.loads((d / f"{name}.json").read_text(encoding="utf-8"))
        preds: list[dict[str, Any]] = []
        pred_file = d / _predictions_file(name)
        if pred_file.exists():
            preds = [
                json.loads(line)
                for line in pred_file.read_text(encoding="utf-8").splitlines()
                if line.strip()
            ]
        return cls.from_dict(data, preds)

    def format_table(self, markdown: bool = False) -> str:
        """Per-task table ``task | metric | score % | n`` with macro and micro rows."""
        rows = [
            [t, m, _pct(self.metrics[t][m]), str(int(self.metrics[t]["n"]))] for t, m in self.primary.items()
        ]
        n_total = sum(int(self.metrics[t]["n"]) for t in self.primary)
        rows.append(["macro", "-", _pct(self.macro), str(len(self.primary))])
        rows.append(["micro", "-", _pct(self.micro), str(n_total)])
        return _summary_table(["task", "metric", "score %", "n"], rows, markdown)

    def __str__(self) -> str:
        return self.format_table()


def compare_table(before: EvalResult, after: EvalResult, markdown: bool = False) -> str:
    """Before/after table ``task | metric | before % | after % | delta`` with macro and micro rows.

    Tasks are listed in ``after``'s order, then any only in ``before``; a task missing on one side
    shows ``-``.
    """
    tasks = list(after.primary) + [t for t in before.primary if t not in after.primary]
    rows = []
    for t in tasks:
        b = before.score(t) if t in before.primary else None
        a = after.score(t) if t in after.primary else None
        metric = after.primary.get(t) or before.primary[t]
        rows.append([t, metric, _opt_pct(b), _opt_pct(a), _delta(b, a)])
    for name in ("macro", "micro"):
        b, a = getattr(before, name), getattr(after, name)
        rows.append([name, "-", _opt_pct(b), _opt_pct(a), _delta(b, a)])
    return _summary_table(["task", "metric", "before %", "after %", "delta"], rows, markdown)


def _predictions_file(name: str) -> str:
    return "predictions.jsonl" if name == "metrics" else f"{name}_predictions.jsonl"


def _summary_table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    """Per-task rows then the macro and micro rows: Markdown, or plain text with a rule above the averages."""
    if markdown:
        return markdown_table(header, rows)
    return text_table(header, rows, left_columns=2, footer_rows=2)


def _pct(x: float) -> str:
    return "nan" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def _opt_pct(x: float | None) -> str:
    return "-" if x is None else _pct(x)


def _delta(b: float | None, a: float | None) -> str:
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return "-"
    return f"{100 * (a - b):+.1f}"
