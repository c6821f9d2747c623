"""Task specifications, examples, and loading a task's train/eval examples from its source.

A :class:`TaskSpec` says where a task's records live (a local file, a Hugging Face dataset or a
built-in generator), how a record becomes a prompt and a target (Python format templates over the
record's fields), how the task is scored, and how train and eval examples are split. :func:`load_task`
turns a spec into :class:`TaskData`: lists of :class:`Example`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random
import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import task_name_problem
from ..errors import TaskSpecError
from .loaders import DataFormatError, Record, is_record_file, read_located_records
from .metrics import METRICS

__all__ = [
    "TASK_TYPES",
    "TRANSFORMS",
    "TaskSpec",
    "TaskSpecError",
    "Example",
    "TaskData",
    "load_task",
    "load_tasks",
    "register_transform",
    "default_data_root",
    "find_data_root",
    "resolve_source",
    "template_fields",
]

#: Allowed values of :attr:`TaskSpec.type`.
TASK_TYPES: tuple[str, ...] = ("generation", "multiple_choice", "classification")


# ------------------------------------------------------------------------------------- data roots


def default_data_root() -> Path:
    """The default folder that relative task sources resolve against.

    ``$MTPEFT_DATA_ROOT`` when set; otherwise the shared data folder beside the repository checkout
    (``<repo>/../shared/data``) when it exists; otherwise ``<cwd>/../shared/data``.
    """
    env = os.environ.get("MTPEFT_DATA_ROOT")
    if env:
        return Path(env).expanduser()
    # src/mtpeft/data/tasks.py -> parents[3] is the repository root (editable/source checkout).
    beside_repo = Path(__file__).resolve().parents[4] / "shared" / "data"
    if beside_repo.is_dir():
        return beside_repo
    return Path.cwd().parent / "shared" / "data"


def find_data_root() -> Path | None:
    """:func:`default_data_root` if that folder exists, else None (for tests that skip without data)."""
    root = default_data_root()
    return root if root.is_dir() else None


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


# -------------------------------------------------------------------------------------- transforms

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


# ------------------------------------------------------------------------------------------- specs

_SCALARS = (str, int, float, bool)


@functools.lru_cache(maxsize=1)
def _spec_types() -> dict[str, Any]:
    import typing

    return typing.get_type_hints(TaskSpec)


def _has_type(value: Any, hint: Any) -> bool:
    """Whether a (YAML-loaded) value fits a TaskSpec annotation; list/dict items may be any scalar."""
    import types
    import typing

    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_has_type(value, h) for h in typing.get_args(hint))
    origin = typing.get_origin(hint) or hint
    if origin is type(None):
        return value is None
    if origin is list:
        return isinstance(value, (list, tuple)) and all(isinstance(v, _SCALARS) for v in value)
    if origin is dict:
        return isinstance(value, Mapping) and all(isinstance(v, _SCALARS) for kv in value.items() for v in kv)
    if origin in (int, float):
        return isinstance(value, (int, float) if origin is float else int) and not isinstance(value, bool)
    return isinstance(value, origin)



@dataclass
class TaskSpec:
    """How to load, template, split and score one task.

    Attributes:
        name: task name (unique within a run; the key of per-task metrics).
        source: a local ``.json``/``.jsonl``/``.csv``/``.tsv``/``.parquet`` file (relative paths resolve
            against the data root), ``"builtin:<name>"`` for a generated demo task, or a Hugging Face
            dataset name (optionally ``"hf:<name>"``) loaded with ``datasets.load_dataset``.
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
    description: str = ""

    def __post_init__(self) -> None:
        def err(msg: str) -> TaskSpecError:
            return TaskSpecError(f"task {self.name!r}: {msg}")

        if not isinstance(self.name, str) or not self.name.strip():
            raise TaskSpecError(f"task name must be a non-empty string, got {self.name!r}")
        problem = task_name_problem(self.name)
        if problem:
            raise TaskSpecError(f"task name {self.name!r} {problem}")
        for f in dataclasses.fields(self):  # every field's type, before any value is used
            value = getattr(self, f.name)
            if not _has_type(value, _spec_types()[f.name]):
                hint = _spec_types()[f.name]
                wanted = hint.__name__ if isinstance(hint, type) else str(hint)
                raise err(f"{f.name} must be {wanted}, got {type(value).__name__} {value!r}")
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


# ----------------------------------------------------------------------------------------- loading

_HF_PREFIX = "hf:"
_BUILTIN_PREFIX = "builtin:"


def resolve_source(source: str, data_root: str | Path | None = None) -> Path | None:
    """Resolve a local source path, or return None when ``source`` names a Hugging Face dataset.

    Absolute paths are kept. Relative paths resolve against ``data_root`` when given; otherwise against
    the working directory when the file exists there, else :func:`default_data_root`. A source with a
    data-file suffix (``.json``...) is always local.

    Raises:
        FileNotFoundError: a local-looking source does not exist (the message lists the paths tried).
    """
    if source.startswith(_HF_PREFIX) or source.startswith(_BUILTIN_PREFIX):
        return None
    p = Path(source).expanduser()
    if p.is_absolute():
        candidates = [p]
    elif data_root is not None:
        candidates = [Path(data_root).expanduser() / p]
    else:
        candidates = [Path.cwd() / p, default_data_root() / p]
    for c in candidates:
        if c.exists():
            return c
    if is_record_file(p) or p.is_absolute() or source.startswith((".", "~")):
        tried = ", ".join(str(c) for c in candidates)
        hint = "" if data_root is not None else " (set data_root or $MTPEFT_DATA_ROOT)"
        raise FileNotFoundError(f"data file {source!r} not found; tried {tried}{hint}")
    return None


def _load_hf(name: str, subset: str | None, split: str) -> list[Record]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise DataFormatError(f"loading Hugging Face dataset {name!r} needs the datasets package") from exc
    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as exc:
        raise DataFormatError(
            f"cannot load Hugging Face dataset {name!r} (subset={subset!r}, split={split!r}): {exc}"
        ) from exc
    where = f"hf:{name}" + (f"/{subset}" if subset else "") + f"[{split}]"
    return [Record(dict(row), where, i + 1, i, "row") for i, row in enumerate(ds)]


def _load_records(spec: TaskSpec, source: str, split: str, data_root: str | Path | None) -> list[Record]:
    path = resolve_source(source, data_root)
    if path is None:
        name = source[len(_HF_PREFIX) :] if source.startswith(_HF_PREFIX) else source
        return _load_hf(name, spec.subset, split)
    if path.is_dir():
        # A dataset folder saved with datasets (save_to_disk) or a local HF dataset script/repo.
        return _load_hf(str(path), spec.subset, split)
    return read_located_records(path, columns=spec.columns, header=spec.tsv_header, split=split)


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
    missing = [f for f in _template_fields(template) if f not in view]
    if missing:
        raise DataFormatError(
            f"task {spec.name!r}: {rec.where()}: {which} template {template!r} uses field "
            f"{missing[0]!r}, which the record lacks; available fields: {sorted(view)}"
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

    Sources: ``builtin:<name>`` (generated, see ``mtpeft.data.builtin``), local files (relative paths
    resolve against ``data_root``, see :func:`resolve_source`) and Hugging Face datasets. The split
    policy is described on :class:`TaskSpec`.

    Raises:
        FileNotFoundError: a local source is missing.
        DataFormatError: a file or record is malformed; the message names task, file, line and field.
    """
    if spec.source.startswith(_BUILTIN_PREFIX):
        from .builtin import builtin_records

        train_recs, eval_recs = builtin_records(spec)
        train = examples_from_records(spec, train_recs)
        evals = examples_from_records(spec, eval_recs)
        return TaskData(spec, train, evals)

    records = _load_records(spec, spec.source, spec.split, data_root)
    if spec.eval_source is not None or spec.eval_split is not None:
        eval_recs = _load_records(
            spec, spec.eval_source or spec.source, spec.eval_split or spec.split, data_root
        )
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
