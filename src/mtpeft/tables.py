"""Tables for people: one Markdown builder and one aligned plain-text builder, used by every report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def format_cell(value: Any) -> str:
    """A table cell: floats with 4 significant digits (``nan`` spelled out), anything else as ``str``."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (cells through :func:`format_cell`)."""
    lines = ["| " + " | ".join(format_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(format_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: Sequence[Any], rows: Sequence[Sequence[Any]], *, left_columns: int = 2,
               footer_rows: int = 0) -> str:
    """A plain-text table for terminals: the first ``left_columns`` columns left-aligned, the rest right-aligned,
    and a rule above the last ``footer_rows`` rows (the macro/micro summary lines)."""
    cells = [[format_cell(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        out = [c.ljust(w) if i < left_columns else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    body = [fmt(r) for r in cells[1:]]
    if footer_rows:
        body = body[:-footer_rows] + [sep] + body[-footer_rows:]
    return "\n".join([fmt(cells[0]), sep, *body])
