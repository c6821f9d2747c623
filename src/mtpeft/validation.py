"""The one dataclass validator: does a field's value (from YAML, JSON or Python) fit its annotation?

Adapter configs (:class:`mtpeft.config.AdapterConfig`), run-config sections
(:mod:`mtpeft.training.run_config`) and task specs (:class:`mtpeft.data.tasks.TaskSpec`) all check their fields
here before any value is used; each wraps the problem in its own error with its own key prefix. Imports nothing
of mtpeft, so every layer can use it.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import re
import types
import typing
import unicodedata
from collections.abc import Mapping
from typing import Any

__all__ = ["field_types", "fits", "type_name", "field_type_problem", "as_float_where_expected",
           "task_name_problem"]

#: What a list item or mapping key/value may be where ``scalar_items`` is asked for (YAML scalars).
SCALARS = (str, int, float, bool)
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass (``from __future__ import annotations`` leaves strings)."""
    return typing.get_type_hints(cls)


def _union_options(hint: Any) -> tuple[Any, ...] | None:
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else None


def fits(value: Any, hint: Any, *, scalar_items: bool = False) -> bool:
    """Whether ``value`` has the annotated type.

    Ints pass as floats, bools never pass as numbers, numpy scalars count as numbers. List and mapping items are
    checked against the annotation's item types, or, with ``scalar_items``, need only be YAML scalars (for fields
    that turn their items into strings afterwards). An annotation this check does not know passes: the owner's
    own validation decides.
    """
    options = _union_options(hint)
    if options is not None:
        return any(fits(value, h, scalar_items=scalar_items) for h in options)
    if hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if scalar_items:
            return all(isinstance(v, SCALARS) for v in value)
        return not args or all(fits(v, args[0]) for v in value)
    if hint is dict or origin is dict:
        if not isinstance(value, Mapping):
            return False
        if scalar_items:
            return all(isinstance(v, SCALARS) for kv in value.items() for v in kv)
        return not args or all(fits(k, args[0]) and fits(v, args[1]) for k, v in value.items())
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if isinstance(hint, type) and hint is not typing.Any:
        return isinstance(value, hint)
    return True


def type_name(hint: Any) -> str:
    """``int`` for a class, the annotation's text otherwise (``list[str] | None``)."""
    return hint.__name__ if isinstance(hint, type) else str(hint)


def field_type_problem(obj: Any, *, items_checked_later: tuple[str, ...] = (),
                       scalar_items: bool = False) -> str | None:
    """The first field of dataclass ``obj`` whose value does not fit its annotation, as
    ``"<field> must be <type>, got <type> <value>"``; None when every field fits.

    Fields named in ``items_checked_later`` are checked as bare containers: their owner checks each item itself,
    with a message that names the item.
    """
    annotations = field_types(type(obj))
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), annotations[f.name]
        checked = (typing.get_origin(hint) or hint) if f.name in items_checked_later else hint
        if not fits(value, checked, scalar_items=scalar_items):
            return f"{f.name} must be {type_name(hint)}, got {type(value).__name__} {value!r}"
    return None


def as_float_where_expected(value: Any, hint: Any) -> Any:
    """A number for a float field: an int, or a float written as text (YAML 1.1 reads ``1e-4``, without a dot,
    as a string), becomes a float where the annotation wants a float and neither an int nor a string."""
    options = _union_options(hint) or (hint,)
    if float not in options or isinstance(value, bool):
        return value
    if isinstance(value, numbers.Real) and not (isinstance(value, numbers.Integral) and int in options):
        return float(value)
    if isinstance(value, str) and str not in options and _FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)
    return value


def task_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a task name, or None. Task names become folder names (``out/peft/<task>``
    exports, per-task files), so they cannot hold a path separator, NUL or another control character (a newline),
    nor start with '.' ('..')."""
    if "/" in name or "\\" in name:
        return "holds a path separator ('/' or '\\'); task names become folder names"
    if "\x00" in name:
        return "holds a NUL character; task names become folder names"
    control = next((c for c in name if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")), None)
    if control is not None:  # a newline or escape would break tables, logs and file names
        return f"holds the control character {control!r}; task names appear in file names, tables and logs"
    if name.startswith("."):
        return "starts with '.' (a hidden or parent folder); task names become folder names"
    return None
