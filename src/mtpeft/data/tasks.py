"""Loading a task: its source's records, split into train and eval, templated into examples.

:func:`load_task` reads a :class:`~mtpeft.data.spec.TaskSpec`'s records through its source kind
(:mod:`mtpeft.data.sources`), applies the spec's split policy and caps, and renders every kept record through the
prompt and target templates, validating labels and options with errors that name the task, file, line and field.
The spec types are re-exported here, where most callers look for them.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .loaders import DataFormatError, Record
from .sources import default_data_root, find_data_root, locate_source, resolve_source
from .spec import TASK_TYPES, Example, TaskData, TaskSpec, TaskSpecError, template_fields
from .transforms import TRANSFORMS, register_transform

__all__ = [
    "TASK_TYPES",
    "TRANSFORMS",
    "TaskSpec",
    "TaskSpecError",
    "Example",
    "TaskData",
    "examples_from_records",
    "load_task",
    "load_tasks",
    "register_transform",
    "default_data_root",
    "find_data_root",
    "resolve_source",
    "template_fields",
]


def _read(spec: TaskSpec, source: str, split: str, data_root: str | Path | None) -> list[Record]:
    kind, location = locate_source(source, data_root)
    if kind.read is None:
        raise DataFormatError(f"task {spec.name!r}: {source!r} is a {kind.name} that makes its own train/eval "
                              f"split; it cannot be read as one split")
    return kind.read(spec, location, split)


def _subsample(items: list[Any], cap: int | None, seed: int) -> list[Any]:
    if cap is None or len(items) <= cap:
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), cap))
    return [items[i] for i in keep]


def _split_size(n: int, test_size: int | float, cap: int | None) -> int:
    k = test_size if isinstance(test_size, int) else int(n * test_size + 1e-9)
    if cap is not None:
        k = min(k, cap)
    if k >= n:
        raise ValueError(f"test_size={test_size} leaves no training records out of {n}")
    return k


def _render(spec: TaskSpec, which: str, template: str, view: Mapping[str, Any], rec: Record) -> str:
    missing = [f for f in template_fields(template) if f not in view]
    if missing:
        raise DataFormatError(
            f"task {spec.name!r}: {rec.where()}: {which} template {template!r} uses field "
            f"{missing[0]!r}, which the record lacks; available fields: {sorted(view)}"
        )
    # format() would render a null as the text "None" and train on it; a null gold label of a scored task is
    # reported below, as a label outside the label set
    scored_label = spec.resolved_label_field() if spec.type != "generation" else None
    null = [f for f in template_fields(template) if view[f] is None and f != scored_label]
    if null:
        raise DataFormatError(
            f"task {spec.name!r}: {rec.where()}: field {null[0]!r} is null, and the {which} template {template!r} "
            f"uses it; fill it in or drop the record"
        )
    try:
        return template.format_map(view)
    except (KeyError, IndexError, AttributeError, ValueError, TypeError) as exc:
        raise DataFormatError(
            f"task {spec.name!r}: {rec.where()}: cannot render {which} template {template!r}: {exc}"
        ) from None


def _to_example(spec: TaskSpec, rec: Record) -> Example:
    where = f"task {spec.name!r}: {rec.where()}"
    data = rec.data
    if spec.transform is not None:
        try:
            data = TRANSFORMS[spec.transform](dict(data))
        except Exception as exc:
            raise DataFormatError(f"{where}: transform {spec.transform!r} failed: {exc}") from None
    view: dict[str, Any] = dict(data)
    for new, old in (spec.fields or {}).items():
        if old not in data:
            raise DataFormatError(
                f"{where}: fields maps {new!r} to record field {old!r}, which the record lacks; "
                f"available fields: {sorted(data)}"
            )
        view[new] = data[old]
    label_field = spec.resolved_label_field()
    if spec.label_map is not None and label_field is not None:
        if label_field not in view:
            raise DataFormatError(
                f"{where}: label field {label_field!r} is missing; available fields: {sorted(view)}"
            )
        raw = str(view[label_field]).strip()
        if raw not in spec.label_map:
            raise DataFormatError(
                f"{where}: label {raw!r} (field {label_field!r}) is not in label_map keys "
                f"{sorted(spec.label_map)}"
            )
        view[label_field] = spec.label_map[raw]
    prompt = _render(spec, "prompt", spec.prompt, view, rec)
    target = _render(spec, "target", spec.target, view, rec)
    meta = {"source": rec.source, "line": rec.line, "index": rec.index}
    if spec.type == "generation":
        return Example(spec.name, prompt, target, None, target.strip(), meta)

    assert label_field is not None  # checked in TaskSpec.__post_init__
    if label_field not in view:
        raise DataFormatError(
            f"{where}: label field {label_field!r} is missing; available fields: {sorted(view)}"
        )
    label = str(view[label_field]).strip()
    if spec.type == "classification":
        options = list(spec.labels or [])
        if label not in options:
            raise DataFormatError(
                f"{where}: label {label!r} (field {label_field!r}) is not in the label set {options}"
            )
    else:
        if spec.options is not None:
            options = list(spec.options)
        else:
            assert spec.options_field is not None
            if spec.options_field not in view:
                raise DataFormatError(
                    f"{where}: options field {spec.options_field!r} is missing; "
                    f"available fields: {sorted(view)}"
                )
            raw_opts = view[spec.options_field]
            if not isinstance(raw_opts, (list, tuple)) or not raw_opts:
                raise DataFormatError(
                    f"{where}: options field {spec.options_field!r} must hold a non-empty list, "
                    f"got {raw_opts!r}"
                )
            options = [str(o).strip() for o in raw_opts]
        if label not in options:
            raise DataFormatError(
                f"{where}: answer {label!r} (field {label_field!r}) is not one of the options {options}"
            )
    option_targets = [_render(spec, "target", spec.target, {**view, label_field: o}, rec) for o in options]
    return Example(spec.name, prompt, target, options, label, meta, option_targets)


def examples_from_records(spec: TaskSpec, records: Iterable[Record]) -> list[Example]:
    """Template located records into examples of ``spec`` (validating labels/options)."""
    return [_to_example(spec, r) for r in records]


def load_task(spec: TaskSpec, data_root: str | Path | None = None) -> TaskData:
    """Load a task's train and eval examples.

    Sources are read by their kind (:func:`~mtpeft.data.sources.locate_source`): local files and
    ``save_to_disk`` folders (relative paths resolve against ``data_root``, see :func:`resolve_source`), Hugging
    Face datasets, and generated ones (``builtin:<name>``, see :mod:`mtpeft.data.builtin`), which make their
    own train/eval split. The split policy is described on :class:`TaskSpec`.

    Raises:
        FileNotFoundError: a local source is missing.
        DataFormatError: a file or record is malformed; the message names task, file, line and field.
    """
    kind, location = locate_source(spec.source, data_root)
    if kind.generate is not None:
        train_recs, eval_recs = kind.generate(spec, location)
        return TaskData(spec, examples_from_records(spec, train_recs), examples_from_records(spec, eval_recs))

    records = _read(spec, spec.source, spec.split, data_root)
    if spec.eval_source is not None or spec.eval_split is not None:
        eval_recs = _read(spec, spec.eval_source or spec.source, spec.eval_split or spec.split, data_root)
        train_recs = records
    elif spec.test_size is not None:
        order = list(range(len(records)))
        random.Random(spec.seed).shuffle(order)
        try:
            k = _split_size(len(records), spec.test_size, spec.test_size_max)
        except ValueError as exc:
            raise DataFormatError(f"task {spec.name!r}: {spec.source}: {exc}") from None
        eval_recs = [records[i] for i in order[:k]]
        train_recs = [records[i] for i in order[k:]]
    else:
        train_recs, eval_recs = records, []
    if not train_recs and not eval_recs:
        raise DataFormatError(f"task {spec.name!r}: source {spec.source!r} holds no records")
    # Cap before templating: only the kept records are templated and validated.
    train = examples_from_records(spec, _subsample(train_recs, spec.max_train, spec.seed))
    evals = examples_from_records(spec, _subsample(eval_recs, spec.max_eval, spec.seed + 1))
    return TaskData(spec, train, evals)


def load_tasks(specs: Sequence[TaskSpec], data_root: str | Path | None = None) -> list[TaskData]:
    """Load several tasks (see :func:`load_task`); task names must be unique."""
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TaskSpecError(f"duplicate task names: {dupes}")
    return [load_task(s, data_root) for s in specs]
