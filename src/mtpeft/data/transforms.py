"""Named record transforms a task spec can apply before templating (``TaskSpec.transform``)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

__all__ = ["RecordTransform", "TRANSFORMS", "register_transform"]

RecordTransform = Callable[[dict[str, Any]], dict[str, Any]]

#: Named record transforms a spec can apply (``TaskSpec.transform``) before templating.
TRANSFORMS: dict[str, RecordTransform] = {}


def register_transform(name: str) -> Callable[[RecordTransform], RecordTransform]:
    """Decorator registering a record transform under ``name`` (usable as ``TaskSpec.transform``)."""

    def deco(fn: RecordTransform) -> RecordTransform:
        if name in TRANSFORMS:
            raise ValueError(f"a record transform named {name!r} is already registered")
        TRANSFORMS[name] = fn
        return fn

    return deco


_ANSWER_FORMAT = re.compile(r"Answer format:\s*(\S+)\s*$")


@register_transform("llm_adapters_options")
def _llm_adapters_options(rec: dict[str, Any]) -> dict[str, Any]:
    """LLM-Adapters commonsense sets: ``Answer format: a/b/c`` (end of ``instruction``) -> ``options``."""
    m = _ANSWER_FORMAT.search(str(rec.get("instruction", "")))
    if not m:
        raise ValueError("field 'instruction' does not end with an 'Answer format: a/b/...' line")
    return {**rec, "options": m.group(1).split("/")}


def _format_number(value: Any) -> str:
    x = float(value)
    if x.is_integer():
        return str(int(x))
    return f"{x:.4f}".rstrip("0").rstrip(".")


@register_transform("numeric_answer")
def _numeric_answer(rec: dict[str, Any]) -> dict[str, Any]:
    """Math sets: write field ``answer`` as a short number (``"576.0"`` -> ``"576"``, 4 decimals at most)."""
    try:
        return {**rec, "answer": _format_number(rec["answer"])}
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"field 'answer' is not a number: {rec.get('answer')!r}") from None


@register_transform("one_decimal_score")
def _one_decimal_score(rec: dict[str, Any]) -> dict[str, Any]:
    """STS-B: write field ``score`` with one decimal (``"3.800"`` -> ``"3.8"``)."""
    try:
        return {**rec, "score": f"{float(rec['score']):.1f}"}
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"field 'score' is not a number: {rec.get('score')!r}") from None
