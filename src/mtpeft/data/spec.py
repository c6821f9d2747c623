"""Task specifications and examples: what a task is, before and after its records are loaded.

A :class:`TaskSpec` says where a task's records live (a local file, a ``datasets.save_to_disk`` folder, a
Hugging Face dataset or a built-in generator; see :mod:`mtpeft.data.sources`), how a record becomes a prompt and a
target (Python format templates over the record's fields), how the task is scored, and how train and eval examples
are split. :func:`mtpeft.data.tasks.load_task` turns a spec into :class:`TaskData`: lists of :class:`Example`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import TaskSpecError
from ..validation import field_type_problem, task_name_problem
from .metrics import METRICS
from .transforms import TRANSFORMS

__all__ = ["TASK_TYPES", "TaskSpec", "TaskSpecError", "Example", "TaskData", "template_fields"]

#: Allowed values of :attr:`TaskSpec.type`.
TASK_TYPES: tuple[str, ...] = ("generation", "multiple_choice", "classification")


# --------------------------------------------------------------------------------------- templates

_FORMATTER = string.Formatter()


def template_fields(template: str) -> list[str]:
    """Names of the record fields a format template uses, in order of first use.

    ``"Q: {input}\\nA:"`` -> ``["input"]``. Attribute/index suffixes are dropped (``{a.b}`` -> ``a``).

    Raises:
        TaskSpecError: the template is malformed or uses positional fields (``{}``, ``{0}``).
    """
    return list(_template_fields(template))


@functools.lru_cache(maxsize=1024)
def _template_fields(template: str) -> tuple[str, ...]:
    names: list[str] = []
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as exc:
        raise TaskSpecError(
            f"malformed template {template!r}: {exc} (write literal braces as {{{{ and }}}})"
        ) from None
    for _, name, _, _ in parsed:
        if name is None:
            continue
        base = re.match(r"[^.\[]*", name).group(0)  # type: ignore[union-attr]
        if base == "" or base.isdigit():
            raise TaskSpecError(
                f"template {template!r} uses a positional field {{{name}}}; name the record field"
            )
        if base not in names:
            names.append(base)
    return tuple(names)


# ------------------------------------------------------------------------------------------- specs


@dataclass
class TaskSpec:
    """How to load, template, split and score one task.

    Attributes:
        name: task name (unique within a run; the key of per-task metrics).
        source: a local ``.json``/``.jsonl``/``.csv``/``.tsv``/``.parquet`` file or a
            ``datasets.save_to_disk`` folder (relative paths resolve against the data root),
            ``"builtin:<name>"`` for a generated demo task, or a Hugging Face dataset name (optionally
            ``"hf:<name>"``) loaded with ``datasets.load_dataset``; see :mod:`mtpeft.data.sources`.
        type: ``"generation"`` (greedy generation, scored by ``metric``), ``"multiple_choice"`` or
            ``"classification"`` (both scored by option log-likelihood).
        prompt: format template over record fields, e.g. ``"Q: {input}\\nA:"``.
        target: format template of the training target, e.g. ``" {target}"`` (leading-space convention:
            the target continues the prompt). EOS is appended by the collator, by token id.
        metric: primary metric (a key of ``METRICS``); default ``exact_match`` for generation and
            ``accuracy`` otherwise. ``extra_metrics`` are reported too.
        subset, split: Hugging Face config name and split; for a JSON file holding several lists keyed
            by split name, ``split`` picks one.
        eval_source, eval_split: where eval examples come from (a second file/dataset, or another split
            of ``source``). Alternatively ``test_size`` (an int, or a fraction in (0, 1), optionally
            capped by ``test_size_max``) carves a fixed-seed eval split out of ``source``: the records
            are shuffled with ``random.Random(seed)``, the first ``k`` are eval, the rest train.
            With none of these, the task has no eval examples.
        seed: seed of the split and of the ``max_train``/``max_eval`` subsampling.
        max_train, max_eval: caps; larger lists are subsampled with ``seed`` (order kept). Only the
            kept records are templated and validated.
        options: fixed answer options of a multiple-choice task; or ``options_field``: the record field
            holding each record's list of options.
        labels: the label set of a classification task; ``label_map`` maps raw values of the label field
            to label text (``{"0": "negative", "1": "positive"}``); labels default to its values.
        label_field: the record field holding the gold label/option; default: the one field the target
            template uses.
        positive_label: positive class for binary ``f1`` (default: the last of two labels).
        fields: renames, ``{template_name: record_field}``: ``{"s1": "#1 String"}`` lets a template
            write ``{s1}`` for the record's ``"#1 String"``.
        columns, tsv_header: column names for CSV/TSV files without a header (GLUE CoLA); with
            ``tsv_header=True`` the file's header row is skipped and ``columns`` used instead.
        transform: name of a registered record transform applied before templating (see
            ``register_transform``).
        stop: generation tasks: stop strings; the prediction is the text before the first one, as with
            lm-eval's ``until``. Default (``None``): ``["\\n"]`` when every target is one line, else none
            (``[]``: only EOS ends an answer). See :meth:`resolved_stop`.
        description: free text.
    """

    name: str
    source: str
    type: str = "generation"
    prompt: str = "{input}"
    target: str = " {target}"
    metric: str | None = None
    extra_metrics: list[str] = field(default_factory=list)
    subset: str | None = None
    split: str = "train"
    eval_source: str | None = None
    eval_split: str | None = None
    test_size: int | float | None = None
    test_size_max: int | None = None
    seed: int = 0
    max_train: int | None = None
    max_eval: int | None = None
    options: list[str] | None = None
    options_field: str | None = None
    labels: list[str] | None = None
    label_map: dict[str, str] | None = None
    label_field: str | None = None
    positive_label: str | None = None
    fields: dict[str, str] | None = None
    columns: list[str] | None = None
    tsv_header: bool | None = None
    transform: str | None = None
    stop: list[str] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        def err(msg: str) -> TaskSpecError:
            return TaskSpecError(f"task {self.name!r}: {msg}")

        if not isinstance(self.name, str) or not self.name.strip():
            raise TaskSpecError(f"task name must be a non-empty string, got {self.name!r}")
        problem = task_name_problem(self.name)
        if problem:
            raise TaskSpecError(f"task name {self.name!r} {problem}")
        # every field's type, before any value is used; list and mapping items may be any scalar (made text below)
        type_problem = field_type_problem(self, scalar_items=True)
        if type_problem:
            raise err(type_problem)
        if not isinstance(self.source, str) or not self.source.strip():
            raise err(f"source must be a non-empty string, got {self.source!r}")
        if self.type not in TASK_TYPES:
            raise err(f"unknown task type {self.type!r}; allowed types: {list(TASK_TYPES)}")
        if self.metric is None:
            self.metric = "exact_match" if self.type == "generation" else "accuracy"
        self.extra_metrics = list(self.extra_metrics)
        for m in [self.metric, *self.extra_metrics]:
            if m not in METRICS:
                raise err(f"unknown metric {m!r}; allowed metrics: {sorted(METRICS)}")
        for attr in ("prompt", "target"):
            tmpl = getattr(self, attr)
            if not isinstance(tmpl, str):
                raise err(f"{attr} template must be a string, got {type(tmpl).__name__}")
            try:
                template_fields(tmpl)
            except TaskSpecError as exc:
                raise err(f"{attr}: {exc}") from None
        if self.test_size is not None:
            if self.eval_source is not None or self.eval_split is not None:
                raise err(
                    "give either test_size (a fixed-seed split of source) or eval_source/eval_split, not both"
                )
            ts = self.test_size
            if isinstance(ts, bool) or not isinstance(ts, (int, float)):
                raise err(f"test_size must be an int or a fraction, got {ts!r}")
            if isinstance(ts, int) and ts < 1:
                raise err(f"test_size must be >= 1 when an int, got {ts}")
            if isinstance(ts, float) and not 0.0 < ts < 1.0:
                raise err(f"test_size must be in (0, 1) when a fraction, got {ts}")
        elif self.test_size_max is not None:
            raise err("test_size_max needs test_size")
        for attr in ("max_train", "max_eval", "test_size_max"):
            v = getattr(self, attr)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise err(f"{attr} must be a non-negative int or None, got {v!r}")
        if self.label_map is not None:
            if not isinstance(self.label_map, Mapping):
                raise err(f"label_map must be a mapping, got {type(self.label_map).__name__}")
            self.label_map = {str(k): str(v) for k, v in self.label_map.items()}
        if self.labels is not None:
            self.labels = [str(x) for x in self.labels]
            if len(set(self.labels)) != len(self.labels):
                raise err(f"labels contain duplicates: {self.labels}")
        if self.options is not None:
            self.options = [str(x) for x in self.options]
            if len(set(self.options)) != len(self.options) or not self.options:
                raise err(f"options must be distinct and non-empty, got {self.options}")
        if self.transform is not None and self.transform not in TRANSFORMS:
            raise err(f"unknown transform {self.transform!r}; registered transforms: {sorted(TRANSFORMS)}")
        if self.type == "classification":
            if self.labels is None and self.label_map is None:
                raise err("a classification task needs labels (the label set) or a label_map")
            if self.labels is None:
                self.labels = list(dict.fromkeys(self.label_map.values()))  # type: ignore[union-attr]
            elif self.label_map is not None:
                stray = [v for v in self.label_map.values() if v not in self.labels]
                if stray:
                    raise err(f"label_map values {stray} are not in labels {self.labels}")
            if len(self.labels) < 2:
                raise err(f"a classification task needs at least two labels, got {self.labels}")
        if self.type == "multiple_choice" and self.options is None and self.options_field is None:
            raise err("a multiple_choice task needs options (a fixed list) or options_field (a record field)")
        needs_label_field = self.type != "generation" or self.label_map is not None
        if needs_label_field and self.resolved_label_field() is None:
            raise err(
                f"cannot tell which record field holds the answer: target template {self.target!r} uses "
                f"{template_fields(self.target)}; set label_field"
            )
        if (
            self.positive_label is not None
            and self.labels is not None
            and self.positive_label not in self.labels
        ):
            raise err(f"positive_label {self.positive_label!r} is not in labels {self.labels}")
        if self.fields is not None:
            self.fields = {str(k): str(v) for k, v in self.fields.items()}
        if self.columns is not None:
            self.columns = [str(c) for c in self.columns]
        if self.stop is not None:
            self.stop = [str(s) for s in self.stop]
            if any(not s for s in self.stop):
                raise err(f"stop strings must be non-empty, got {self.stop!r}")

    # -------------------------------------------------------------------------------- helpers

    def resolved_label_field(self) -> str | None:
        """The field holding the gold answer: ``label_field``, or the target template's only field."""
        if self.label_field is not None:
            return self.label_field
        names = template_fields(self.target)
        return names[0] if len(names) == 1 else None

    def resolved_positive_label(self) -> str | None:
        """Positive class for binary F1: ``positive_label``, or the last label of a two-label task."""
        if self.positive_label is not None:
            return self.positive_label
        if self.labels is not None and len(self.labels) == 2:
            return self.labels[-1]
        return None

    def resolved_stop(self, targets: Iterable[str]) -> list[str]:
        """The stop strings of generation: ``stop``, else a newline when none of ``targets`` (the task's rendered
        targets) spans more than one line, else none."""
        if self.stop is not None:
            return list(self.stop)
        return [] if any("\n" in t.strip() for t in targets) else ["\n"]

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of every field (YAML/JSON-friendly); :meth:`from_dict` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskSpec:
        """Build a spec from a dict (e.g. a task entry of a YAML run config).

        Raises:
            TaskSpecError: unknown keys (named, with the allowed ones listed), missing ``name`` or
                ``source``, or any validation error of the spec.
        """
        if not isinstance(data, Mapping):
            raise TaskSpecError(f"a task spec must be a mapping, got {type(data).__name__}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in allowed]
        label = f"task {data.get('name')!r}" if "name" in data else "task spec"
        if unknown:
            raise TaskSpecError(f"{label}: unknown key(s) {unknown}; allowed keys: {allowed}")
        missing = [k for k in ("name", "source") if k not in data]
        if missing:
            raise TaskSpecError(f"{label}: missing required key(s) {missing}")
        return cls(**dict(data))


@dataclass
class Example:
    """One templated example.

    Attributes:
        task: the task's name.
        prompt: the rendered prompt.
        target: the rendered training target (with template spaces, without EOS).
        options: the answer options (multiple choice / classification), as answer texts.
        label: the gold answer text without template spaces: for generation ``target.strip()``,
            otherwise the gold option/label.
        meta: where the example came from (``source``, ``line``, ``index``).
        option_targets: each option rendered through the target template (what option
            log-likelihood scores after the prompt); same order as ``options``.
    """

    task: str
    prompt: str
    target: str
    options: list[str] | None = None
    label: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    option_targets: list[str] | None = None

    @property
    def reference(self) -> str:
        """The answer a prediction is scored against (``label``, else the stripped target)."""
        return self.label if self.label is not None else self.target.strip()


@dataclass
class TaskData:
    """A loaded task: its spec and its train and eval examples."""

    spec: TaskSpec
    train: list[Example]
    eval: list[Example]

    @property
    def name(self) -> str:
        """The task's name."""
        return self.spec.name
