"""Bad input: property-based fuzzing of the config, data and adapter loaders (hypothesis).

Every generated input must end in a *handled* outcome: a valid result, or a clear error of one of our
own types (``RunConfigError``, ``ConfigError``, ``DataFormatError``, ``TaskSpecError``,
``TruncationError``, ``AdapterLoadError``), or a ``ValueError``/``FileNotFoundError`` raised by mtpeft
code itself, never a raw ``KeyError``/``TypeError``/``AttributeError``/``UnicodeDecodeError``/JSON or
YAML error escaping from deep inside a library. :func:`_outcome` enforces that for every example;
anything else propagates and hypothesis reports the minimal failing input.

The examples are derandomized (same inputs every run) and no hypothesis database is written. Every
test tallies what its inputs produced; the table is printed at the end of the module (run with ``-s``)
and written as JSON to ``$MTPEFT_FUZZ_REPORT`` when that is set.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle
import string
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import tiny_model
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import mtpeft
from mtpeft.config import AdapterConfig, ConfigError
from mtpeft.data.collator import IGNORE_INDEX, TRUNCATION_POLICIES, MultiTaskCollator, TruncationError
from mtpeft.data.loaders import DataFormatError, read_records
from mtpeft.data.mixing import MixtureSampler
from mtpeft.data.resolve import resolve_task_specs
from mtpeft.data.tasks import Example, TaskSpec, TaskSpecError, load_task, load_tasks
from mtpeft.model import AdapterLoadError, MTModel
from mtpeft.registry import available_methods, config_from_dict, get_method
from mtpeft.training.run_config import (
    _SECTIONS,
    RunConfig,
    RunConfigError,
    load_run_config,
    method_config_for,
    run_config_from_dict,
)
from mtpeft.training.trainer import TrainingError

pytestmark = pytest.mark.xdist_group("fuzz")  # one worker runs the module, so its tally is complete

PACKAGE_DIR = Path(mtpeft.__file__).resolve().parent
OUR_ERRORS = (RunConfigError, ConfigError, DataFormatError, TaskSpecError, TruncationError, AdapterLoadError,
              TrainingError)
FUZZ = settings(max_examples=150, deadline=None, database=None, derandomize=True, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

#: test -> outcome label -> number of calls that ended so (a test may make several calls per input)
TALLY: dict[str, Counter] = defaultdict(Counter)
#: test -> number of generated inputs it ran
INPUTS: Counter = Counter()


def _raised_in_mtpeft(exc: BaseException) -> bool:
    """Whether the innermost frame of the exception's traceback is mtpeft code."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return PACKAGE_DIR in Path(tb.tb_frame.f_code.co_filename).resolve().parents


def _outcome(test: str, label: str, fn, *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """Call ``fn``; return ("ok", result) or (error type name, exception) for handled errors.

    Handled: one of :data:`OUR_ERRORS`, or a ValueError / FileNotFoundError that mtpeft code raised itself
    (innermost frame in the package). Anything else propagates (the fuzz test fails on it).
    """
    try:
        result = fn(*args, **kwargs)
        kind = "ok"
    except OUR_ERRORS as exc:
        result, kind = exc, type(exc).__name__
    except (ValueError, FileNotFoundError) as exc:
        if not _raised_in_mtpeft(exc):
            raise
        result, kind = exc, f"{type(exc).__name__}(mtpeft)"
    if kind != "ok":
        assert str(result).strip(), f"{kind} with an empty message"
    TALLY[test][f"{label}: {kind}" if label else kind] += 1
    return kind, result


@pytest.fixture(scope="module", autouse=True)
def _report():
    """Print (and optionally save) what every fuzz test's inputs produced."""
    yield
    lines = ["", "fuzz outcomes (inputs per test, and what the calls on them produced):"]
    for test, counts in TALLY.items():
        inputs = f"{INPUTS[test]} generated inputs" if test in INPUTS else "fixed inputs"
        lines.append(f"  {test}: {inputs}, {sum(counts.values())} calls")
        lines.extend(f"      {n:5d}  {label}" for label, n in sorted(counts.items()))
    print("\n".join(lines), file=sys.stderr)
    target = os.environ.get("MTPEFT_FUZZ_REPORT")
    if target:
        report = {t: {"inputs": INPUTS.get(t), "outcomes": dict(c)} for t, c in TALLY.items()}
        Path(target).write_text(json.dumps(report, indent=2, sort_keys=True))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# --- strategies -----------------------------------------------------------------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=10)


def rare(draw: Any, n: int) -> bool:
    """True about once in ``n`` draws; its simplest value (what hypothesis shrinks to) is False."""
    return draw(st.sampled_from([False] * (n - 1) + [True]))


def mostly(plausible: Any, junk: Any = json_values, parts: int = 3) -> Any:
    """``parts`` parts plausible values, one part anything (mistyped, out of range, nested)."""
    return st.one_of(*[plausible] * parts, junk)


CHOICES = {"dtype": ["float32", "bfloat16", "float16"], "truncation": ["left", "right", "error"],
           "mixing": ["proportional", "temperature", "uniform"], "schedule": ["cosine", "linear", "constant"],
           "precision": ["fp32", "bf16"], "nan_policy": ["error", "skip"], "device": ["cpu"],
           "align_loss": ["kl", "mmd"], "align_pooling": ["position", "pooled"], "gating": ["task", "token"],
           "block_type": ["mlp", "attention"], "spectral_mode": ["released", "paper"],
           "complexity": ["entropy"], "block_init": ["svd", "random"], "train_mode": ["shared", "task_masked"],
           "target_modules": ["all-linear", "q_proj"], "init": ["kaiming", "gaussian"]}


def field_values(f: dataclasses.Field) -> Any:
    """Plausible values of a dataclass field, from its allowed choices or its default's type."""
    default = f.default if f.default is not dataclasses.MISSING else None
    if f.name in CHOICES:
        return st.sampled_from(CHOICES[f.name] + [default] if default is not None else CHOICES[f.name])
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(0, 8)
    if isinstance(default, float):
        return st.floats(0, 2)
    if isinstance(default, str):
        return st.just(default) | st.text(max_size=6)
    return st.none() | st.integers(1, 4)


FIELD_NAMES = ["input", "target", "label", "options", "answer", "sentence"]
records = st.lists(st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=5), json_values, max_size=5),
                   max_size=6)
BAD_BYTES = [b"\xff", b"\xc3\x28", b"\x80", b"\xed\xa0\x80", b"\x00", b"\xfe\xff"]
TRICKY_TEXT = st.text(alphabet=string.printable + "\u00e9\u2028\u0085\ufeff\"',\t\\{}[]", max_size=30)


def _delimited(rows: list[dict[str, Any]], sep: str) -> str:
    header = list(dict.fromkeys(k for r in rows for k in r)) or ["input"]
    lines = [sep.join(header)]
    for r in rows:
        lines.append(sep.join(str(r.get(k, "")) for k in header[: len(r) or 1]))
    return "\n".join(lines) + "\n"


@st.composite
def record_files(draw) -> tuple[str, bytes, str]:
    """(suffix, content, label): structured records, malformed text, binary noise, deep or long documents."""
    suffix = draw(st.sampled_from([".json", ".jsonl", ".csv", ".tsv"]))
    kind = draw(st.sampled_from(["records", "records", "values", "text", "binary", "deep", "long", "dupkeys"]))
    if kind == "records":
        rows = draw(records)
        if suffix == ".json":
            text = json.dumps(rows if draw(st.booleans()) else {draw(st.text(max_size=5)): rows})
        elif suffix == ".jsonl":
            text = "".join(json.dumps(r) + "\n" for r in rows)
        else:
            text = _delimited(rows, "\t" if suffix == ".tsv" else ",")
        data = text.encode()
    elif kind == "values":
        data = json.dumps(draw(json_values)).encode()
    elif kind == "text":
        data = draw(TRICKY_TEXT).encode()
    elif kind == "binary":
        data = draw(st.binary(max_size=200))
    elif kind == "deep":  # nesting deeper than the JSON parser's recursion limit
        depth = draw(st.sampled_from([50, 5_000, 200_000]))
        data = ("[" * depth + "]" * depth if draw(st.booleans()) else '{"a":' * depth + "1" + "}" * depth).encode()
    elif kind == "long":  # one very long line / field (over csv's 128 KiB field limit)
        n = draw(st.sampled_from([1_000, 200_000]))
        field = "x" * n
        data = {".json": json.dumps([{"input": field}]), ".jsonl": json.dumps({"input": field}) + "\n",
                ".csv": f"input,target\n{field},y\n", ".tsv": f"input\ttarget\n{field}\ty\n"}[suffix].encode()
    else:  # several lists under repeated keys: json keeps the last one
        keys = draw(st.lists(st.sampled_from(["a", "b"]), min_size=1, max_size=4))
        parts = [f'"{k}": {json.dumps(draw(records))}' for k in keys]
        data = ("{" + ", ".join(parts) + "}").encode()
    label = kind
    if rare(draw, 4) and data:  # cut short
        data = data[: draw(st.integers(0, len(data) - 1))]
        label += "+cut"
    if rare(draw, 4):  # a non-UTF-8 byte somewhere
        pos = draw(st.integers(0, len(data)))
        data = data[:pos] + draw(st.sampled_from(BAD_BYTES)) + data[pos:]
        label += "+bad-bytes"
    if rare(draw, 8):
        data = b"\xef\xbb\xbf" + data
        label += "+bom"
    return suffix, data, label


# --- data files ---------------------------------------------------------------------------------------------
@FUZZ
@given(case=record_files(), split=st.none() | st.sampled_from(["a", "b", "train"]))
def test_fuzz_record_files(workdir, case, split):
    INPUTS["read_records"] += 1
    suffix, data, label = case
    path = workdir / f"records{suffix}"
    path.write_bytes(data)
    kind, result = _outcome("read_records", f"{suffix} {label.split('+')[0]}", read_records, path, split=split)
    if kind == "ok":
        assert isinstance(result, list) and all(isinstance(r, dict) for r in result)
    else:
        assert isinstance(result, DataFormatError), result
        assert str(path) in str(result), result  # names the file


def test_deep_json_and_duplicate_list_keys_are_clear_errors(tmp_path):
    """Two inputs found by fuzzing, pinned: JSON nested deeper than the parser allows, and repeated keys."""
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(DataFormatError, match=r"deep\.json.*nested too deeply"):
        read_records(deep)
    deep_lines = tmp_path / "deep.jsonl"
    deep_lines.write_text('{"input": "ok"}\n' + '{"a":' * 200_000 + "1" + "}" * 200_000 + "\n")
    with pytest.raises(DataFormatError, match=r"deep\.jsonl line 2.*nested too deeply"):
        read_records(deep_lines)
    dup = tmp_path / "dup.json"
    dup.write_text('{"a": [], "a": [{"input": "x"}]}')
    assert read_records(dup) == [{"input": "x"}]  # json semantics: the last value of a repeated key wins


# Field text with every character that some line splitter treats as a line break.
field_text = st.text(alphabet=string.ascii_letters + " ,;\"'\t\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\u00e9",
                     max_size=12)


@FUZZ
@given(rows=st.lists(st.fixed_dictionaries({"input": field_text, "target": field_text}), min_size=1, max_size=5),
       suffix=st.sampled_from([".json", ".jsonl", ".csv", ".tsv"]))
def test_fuzz_valid_files_round_trip(workdir, rows, suffix):
    """Valid files read back exactly, whatever their strings hold (line/paragraph separators, quotes, tabs)."""
    INPUTS["valid files round-trip"] += 1
    import csv
    import io

    path = workdir / f"valid{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    else:
        if suffix == ".tsv":  # TSV is read unquoted (GLUE): its fields cannot hold tabs or line breaks
            rows = [{k: "".join(c for c in v if c not in "\t\r\n") for k, v in r.items()} for r in rows]
            text = "".join(f"{a}\t{b}\n" for a, b in [("input", "target")] + [(r["input"], r["target"]) for r in rows])
        else:
            buf = io.StringIO()
            writer = csv.writer(buf)  # "\r\n" rows: it then quotes fields holding a bare "\r" too
            writer.writerow(["input", "target"])
            writer.writerows([[r["input"], r["target"]] for r in rows])
            text = buf.getvalue()
        path.write_text(text, encoding="utf-8")
    kind, result = _outcome("valid files round-trip", suffix, read_records, path)
    assert kind == "ok", result
    assert result == rows


FIELD_VALUES: dict[str, Any] = {
    "type": st.sampled_from(["generation", "multiple_choice", "classification"]),
    "prompt": st.sampled_from(["{input}", "Q: {input}\nA:", "{sentence}", "{{literal}} {input}"] * 3
                              + ["{missing}", "{", "}", "{0}", "{input.x}", "{input[0]}", "{input!r}", "{input:>4}"]),
    "target": st.sampled_from([" {target}", " {label}", " {answer}", "{target}{label}", " fixed"]),
    "labels": st.lists(st.sampled_from(["yes", "no", "maybe", "1", "0"]), max_size=3),
    "options": st.lists(st.sampled_from(["A", "B", "C", "yes"]), max_size=3),
    "label_map": st.dictionaries(st.sampled_from(["0", "1", "2"]), st.sampled_from(["yes", "no"]), max_size=3),
    "metric": st.sampled_from(["exact_match", "accuracy", "f1", "rouge_l", "nonsense"]),
    "test_size": st.sampled_from([1, 2, 0.5, 0, 1.5, 100]),
    "max_train": st.integers(-1, 5),
    "label_field": st.sampled_from(["label", "target", "nope"]),
    "options_field": st.sampled_from(["options", "nope"]),
    "transform": st.sampled_from(["numeric_answer", "nope"]),
    "fields": st.dictionaries(st.sampled_from(["input", "q"]), st.sampled_from(["sentence", "input", "nope"]),
                              max_size=2),
    "columns": st.lists(st.sampled_from(["input", "target", "label"]), max_size=3),
}
TASK_SPEC_FIELDS = [f.name for f in dataclasses.fields(TaskSpec)]


@st.composite
def spec_mappings(draw, source: str) -> dict[Any, Any]:
    """A task-spec mapping: plausible values, mistyped values, unknown and missing keys."""
    out: dict[Any, Any] = {}
    if not rare(draw, 20):
        out["name"] = draw(st.sampled_from(["t", "task_1"])) if not rare(draw, 10) else draw(json_values)
    if not rare(draw, 20):
        out["source"] = source if not rare(draw, 10) else draw(json_values)
    for key in draw(st.lists(st.sampled_from(TASK_SPEC_FIELDS), max_size=4, unique=True)):
        if key in ("name", "source"):
            continue
        plausible = FIELD_VALUES.get(key)
        out[key] = draw(plausible) if plausible is not None and not rare(draw, 5) else draw(json_values)
    if rare(draw, 8):
        out[draw(st.text(max_size=6) | st.integers())] = draw(json_values)
    return out


@FUZZ
@given(data=st.data())
def test_fuzz_task_specs_and_records_end_to_end(workdir, data):
    """Random task specs over random record files: load_task yields examples or a located error."""
    INPUTS["task spec + load_task"] += 1
    suffix = data.draw(st.sampled_from([".jsonl", ".json", ".csv"]))
    rows = data.draw(st.lists(st.fixed_dictionaries(
        {}, optional={"input": json_values, "target": json_values, "label": json_values | st.sampled_from(
            ["yes", "no", "0", "1"]), "options": json_values | st.just(["A", "B"]),
                      "answer": json_values, "sentence": json_values}), max_size=6))
    path = workdir / f"task{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text(_delimited(rows, ","))
    mapping = data.draw(spec_mappings(str(path)))
    kind, spec = _outcome("task spec + load_task", "TaskSpec.from_dict", TaskSpec.from_dict, mapping)
    if kind != "ok":
        assert isinstance(spec, TaskSpecError), spec
        return
    kind, loaded = _outcome("task spec + load_task", "load_task", load_task, spec)
    if kind == "ok":
        for ex in loaded.train + loaded.eval:
            assert isinstance(ex.prompt, str) and isinstance(ex.target, str)
            if spec.type == "classification":
                assert ex.label in spec.labels
            if spec.type != "generation":
                assert ex.label in ex.options
    elif isinstance(loaded, DataFormatError):
        assert str(path) in str(loaded) or spec.source in str(loaded), loaded


@FUZZ
@given(labels=st.lists(st.text(min_size=1, max_size=4), min_size=2, max_size=4, unique=True), data=st.data())
def test_fuzz_labels_outside_the_label_set(workdir, labels, data):
    INPUTS["labels outside the label set"] += 1
    golds = data.draw(st.lists(mostly(st.sampled_from(labels), st.text(max_size=4) | st.integers() | json_values),
                               min_size=1, max_size=6))
    path = workdir / "labels.jsonl"
    path.write_text("".join(json.dumps({"input": f"x{i}", "label": g}) + "\n" for i, g in enumerate(golds)))
    assume(len({s.strip() for s in labels}) == len(labels) and all(s.strip() for s in labels))
    spec = TaskSpec(name="cls", source=str(path), type="classification", target=" {label}", labels=labels)
    outside = [i for i, g in enumerate(golds) if str(g).strip() not in spec.labels]
    kind, result = _outcome("labels outside the label set", "", load_task, spec)
    if outside:
        assert isinstance(result, DataFormatError), result
        assert f"{path} line {outside[0] + 1}" in str(result) and "not in the label set" in str(result)
    else:
        assert kind == "ok"


def test_empty_tasks_are_clear_errors(tmp_path):
    cases = {"blank.jsonl": "\n\n  \n", "empty.json": "[]", "header_only.csv": "input,target\n",
             "no_records.json": '{"examples": []}'}
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        kind, result = _outcome("empty tasks", name, load_task, TaskSpec(name="t", source=str(path)))
        assert isinstance(result, DataFormatError), (name, result)
        assert str(path) in str(result) and ("empty" in str(result) or "no records" in str(result))
    path = tmp_path / "one.jsonl"
    path.write_text('{"input": "a", "target": "b"}\n')
    kind, result = _outcome("empty tasks", "test_size leaves no train",
                            load_task, TaskSpec(name="t", source=str(path), test_size=1))
    assert isinstance(result, DataFormatError) and "leaves no training records" in str(result)


# --- task names -----------------------------------------------------------------------------------------------
ESCAPING = ["../../evil", "..", ".", "a/b", "/abs", "a\\b", "..\\x", "a\x00b", ".hidden", "x/../../y"]
name_text = st.text(alphabet=string.ascii_letters + "._-/\\\x00 :~", min_size=1, max_size=12)


def _unsafe(name: str) -> bool:
    return any(c in name for c in "/\\\x00") or name.startswith(".")


@FUZZ
@given(name=name_text | st.sampled_from(ESCAPING))
def test_fuzz_task_names_cannot_escape_the_output_folder(workdir, name):
    INPUTS["task names as paths"] += 1
    kind_cfg, cfg = _outcome("task names as paths", "AdapterConfig", mtpeft.LoRAConfig, tasks=[name])
    kind_spec, spec = _outcome("task names as paths", "TaskSpec", TaskSpec, name=name, source="x.jsonl")
    if _unsafe(name) or not name.strip():
        assert isinstance(cfg, ConfigError) and isinstance(spec, TaskSpecError), (name, cfg, spec)
        if name.strip():
            assert repr(name) in str(cfg) and repr(name) in str(spec)
    else:  # accepted names stay one level inside the folder they are joined to (demo export: out/peft/<task>)
        assert kind_cfg == kind_spec == "ok", (name, cfg, spec)
        exports = (workdir / "out" / "peft").resolve()
        assert (exports / name).resolve().parent == exports


@FUZZ
@given(names=st.lists(st.sampled_from(["a", "b", "c", "sst2"]), min_size=2, max_size=5))
def test_fuzz_duplicate_task_names(names):
    INPUTS["duplicate task names"] += 1
    dupes = sorted({n for n in names if names.count(n) > 1})
    assume(dupes)
    kind, result = _outcome("duplicate task names", "AdapterConfig", mtpeft.MTLLoRAConfig, tasks=names)
    assert isinstance(result, ConfigError) and str(dupes) in str(result)
    specs = [TaskSpec(name=n, source="builtin:x") for n in names]
    kind, result = _outcome("duplicate task names", "load_tasks", load_tasks, specs)
    assert isinstance(result, TaskSpecError) and str(dupes) in str(result)
    cfg = run_config_from_dict({"tasks": [{"name": n, "source": "x.jsonl"} for n in names]})
    kind, result = _outcome("duplicate task names", "run config", resolve_task_specs, cfg)
    assert kind != "ok" and str(dupes) in str(result)


# --- run configs ------------------------------------------------------------------------------------------------
SECTION_KEYS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in _SECTIONS.items()}
PLAUSIBLE = st.one_of(st.integers(-2, 300), st.floats(-1, 3), st.sampled_from(
    ["left", "right", "error", "cosine", "fp32", "bf16", "skip", "uniform", "float32", "cpu", "smollm2", ""]),
    st.booleans(), st.none())
odd_keys = st.one_of(st.text(max_size=6), st.integers(-3, 3), st.none(), st.booleans())
METHOD_KEYS = sorted({f.name for m in available_methods() for f in dataclasses.fields(get_method(m).config_class)})


SMALL = st.one_of(st.integers(0, 6), st.floats(-1, 3), st.sampled_from(["all-linear", "kl", "mmd", "x"]),
                  st.booleans(), st.none(), st.lists(st.sampled_from(["q_proj", "v_proj", "a"]), max_size=2))


@st.composite
def method_mappings(draw, values: Any = None, tasks: bool = True) -> Any:
    """An adapter-config mapping: mostly the method's own fields with plausible values (``values``:
    the strategy for every value instead), sometimes another method's fields, unknown keys or junk."""
    if rare(draw, 20):
        return draw(json_values)
    out: dict[Any, Any] = {}
    method = draw(st.sampled_from(available_methods()))
    if not rare(draw, 16):
        out["method"] = method if not rare(draw, 10) else draw(st.text(max_size=6) | json_values)
    fields = {f.name: f for f in dataclasses.fields(get_method(method).config_class)}
    names = st.sampled_from(sorted(fields))
    for key in draw(st.lists(mostly(names, st.sampled_from(METHOD_KEYS)), max_size=4, unique=True)):
        if key == "tasks" and not tasks:
            continue
        plausible = field_values(fields[key]) if key in fields else st.none()
        out[key] = draw(values if values is not None else mostly(plausible))
    if tasks and "tasks" not in out and not rare(draw, 10):
        out["tasks"] = ["a", "b"]
    if rare(draw, 6):
        out[draw(odd_keys)] = draw(json_values)
    return out


@st.composite
def run_config_mappings(draw) -> Any:
    if rare(draw, 30):
        return draw(json_values)
    out: dict[Any, Any] = {}
    for name, keys in SECTION_KEYS.items():
        if draw(st.booleans()):
            if rare(draw, 20):
                out[name] = draw(json_values)
                continue
            fields = {f.name: f for f in dataclasses.fields(_SECTIONS[name])}
            section = {k: draw(mostly(field_values(fields[k]), parts=12))
                       for k in draw(st.lists(st.sampled_from(keys), max_size=3))}
            if rare(draw, 20):
                section[draw(odd_keys)] = 1
            out[name] = section
    if not rare(draw, 16):
        presets = st.sampled_from(["demo", "demo:copy", "glue:cola", "bbh:snarks", "nope"])
        out["tasks"] = draw(mostly(st.lists(mostly(presets | spec_mappings("x.jsonl")), min_size=1, max_size=3),
                                   st.sampled_from(["demo", "", "nope"]) | json_values))
    if draw(st.booleans()):
        out["method"] = draw(method_mappings(tasks=False) | st.sampled_from(available_methods()))
    for key in ("output_dir", "name"):
        if rare(draw, 4):
            out[key] = draw(mostly(st.text(max_size=8)))
    if rare(draw, 20):
        out[draw(odd_keys)] = draw(json_values)
    return out


def _validate(cfg: RunConfig) -> Any:
    """What `mtpeft validate` does after the config parses (tasks, method), then what the Trainer builds
    from the validated sections before any data is read (the mixture sampler)."""
    specs = resolve_task_specs(cfg)
    method = method_config_for(cfg, [s.name for s in specs])
    for spec in specs:  # the run config's caps were applied to valid specs: they must still be valid
        TaskSpec.from_dict(spec.to_dict())
    MixtureSampler([10 + i for i in range(len(specs))], cfg.train.batch_size, strategy=cfg.data.mixing,
                   temperature=cfg.data.temperature, task_balanced=cfg.data.task_balanced, seed=cfg.train.seed)
    return method


@settings(FUZZ, max_examples=300)
@given(mapping=run_config_mappings())
def test_fuzz_run_config_mappings(mapping):
    INPUTS["run_config_from_dict"] += 1
    kind, cfg = _outcome("run_config_from_dict", "parse", run_config_from_dict, copy.deepcopy(mapping))
    if kind != "ok":
        assert isinstance(cfg, RunConfigError), cfg
        return
    assert isinstance(cfg, RunConfig)
    _outcome("run_config_from_dict", "validate tasks + method", _validate, cfg)


YAML_SNIPPETS = ["[1, 2", "{a: 1}", "!!python/object:os.system", "null", "1e-4", "yes", "~", "'quoted'", "a: b",
                 "2024-01-01", "2024-13-45", "!!float abc", "!!timestamp x", "0x1F", ".inf", "- x", "&a x", "*a",
                 "{", "}", "\t", "é", "\x00", "[]"]
KEY_PARTS = ["train", "lr", "steps", "data", "max_length", "method", "r", "model", "name", "tasks", "eval",
             "output_dir", "x", "", " ", "0"]


@st.composite
def overrides(draw) -> str:
    if rare(draw, 10):
        return draw(st.text(max_size=10))  # maybe no '=' at all
    if not rare(draw, 3):  # a real key with a plausible (or odd) value
        section = draw(st.sampled_from(sorted(SECTION_KEYS)))
        f = draw(st.sampled_from(dataclasses.fields(_SECTIONS[section])))
        value = draw(mostly(field_values(f).map(lambda v: yaml.safe_dump(v).removesuffix("\n...\n").strip()),
                            st.sampled_from(YAML_SNIPPETS)))
        return f"{section}.{f.name}={value}"
    key = ".".join(draw(st.lists(st.sampled_from(KEY_PARTS) | st.text(alphabet="ab.", max_size=3),
                                 min_size=1, max_size=3)))
    value = draw(st.sampled_from(YAML_SNIPPETS) | st.text(max_size=8) | PLAUSIBLE.map(str))
    return f"{key}={value}"


BASE_YAML = "tasks: [demo]\nmethod: {method: lora, r: 4}\ntrain: {steps: 5, lr: 0.001}\n"


@settings(FUZZ, max_examples=300)
@given(document=st.sampled_from([BASE_YAML, BASE_YAML + "seed: 2024-13-45\n", "train: !!float abc\n"])
       | st.text(max_size=40) | json_values.map(yaml.safe_dump) | st.binary(max_size=40),
       sets=st.lists(overrides(), max_size=4))
def test_fuzz_yaml_files_and_set_overrides(workdir, document, sets):
    INPUTS["load_run_config + --set"] += 1
    path = workdir / "run.yaml"
    if isinstance(document, bytes):
        path.write_bytes(document)
    else:
        path.write_text(document, encoding="utf-8", errors="surrogatepass")
    label = "base config" if document == BASE_YAML else "random document"
    kind, result = _outcome("load_run_config + --set", label, load_run_config, path, sets)
    if kind != "ok":
        assert isinstance(result, RunConfigError), result
        assert str(path) in str(result) or "--set" in str(result), result  # names the file or the override


# --- adapter configs and target modules -------------------------------------------------------------------------
@settings(FUZZ, max_examples=300)
@given(mapping=method_mappings())
def test_fuzz_adapter_configs(mapping):
    INPUTS["config_from_dict"] += 1
    kind, result = _outcome("config_from_dict", "", config_from_dict, mapping)
    if kind != "ok":
        assert isinstance(result, ConfigError), result
    else:
        assert isinstance(result, AdapterConfig)
        assert config_from_dict(json.loads(json.dumps(result.to_dict()))) == result  # round-trips


MODULE_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head",
                "embed_tokens", "mlp", "self_attn", "layers.0.mlp.up_proj"]
regexish = st.text(alphabet="qkvo_proj.*+?()[]{}|^$\\0123456789", max_size=12)


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return tiny_model()


@FUZZ
@given(method=st.sampled_from(["lora", "mtl_lora", "hydralora", "align_lora"]),
       targets=st.sampled_from(["all-linear"]) | regexish | st.lists(st.sampled_from(MODULE_NAMES) | regexish,
                                                                     min_size=1, max_size=3),
       exclude=st.lists(st.sampled_from(MODULE_NAMES), max_size=2),
       layers=st.none() | st.lists(st.integers(-1, 3), max_size=2))
def test_fuzz_target_modules(base, method, targets, exclude, layers):
    INPUTS["get_mt_model target_modules"] += 1
    cfg = {"method": method, "tasks": ["a", "b"], "r": 2, "target_modules": targets, "exclude_modules": exclude,
           "layers_to_transform": layers}
    kind, model = _outcome("get_mt_model target_modules", method, mtpeft.get_mt_model, copy.deepcopy(base), cfg)
    if kind == "ok":
        assert model.adapter_layers
    else:
        assert isinstance(model, ConfigError), model
        assert "target" in str(model) or "module" in str(model), model


# --- collator truncation ----------------------------------------------------------------------------------------
class CharTokenizer:
    """One token per character; BOS (1) is prepended when special tokens are asked for; EOS 2, pad 0."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0
    all_special_ids = [0, 1, 2]

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [3 + ord(c) % 90 for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


@FUZZ
@given(rows=st.lists(st.tuples(st.text(max_size=40), st.text(max_size=12)), min_size=1, max_size=4),
       max_length=st.integers(2, 40), policy=st.sampled_from(TRUNCATION_POLICIES))
def test_fuzz_sequences_over_the_length_limit(rows, max_length, policy):
    INPUTS["collator truncation"] += 1
    collator = MultiTaskCollator(CharTokenizer(), ["t"], max_length=max_length, truncation=policy)
    examples = [Example("t", p, t) for p, t in rows]
    kind, batch = _outcome("collator truncation", policy, collator, examples)
    expect_error = False
    for prompt, target in rows:
        p, t = 1 + len(prompt), len(target) + 1
        if t > max_length or (p + t > max_length and (policy == "error" or (policy == "right" and p >= max_length))):
            expect_error = True
    assert (kind != "ok") == expect_error, (kind, batch)
    if kind != "ok":
        assert isinstance(batch, TruncationError) and "max_length" in str(batch)
        return
    for row, (_, target) in enumerate(rows):
        n = int(batch["attention_mask"][row].sum())
        ids, labels = batch["input_ids"][row, :n].tolist(), batch["labels"][row, :n].tolist()
        assert n <= max_length
        assert all(x == IGNORE_INDEX for x in batch["labels"][row, n:].tolist())
        target_ids = CharTokenizer()(target, add_special_tokens=False)["input_ids"] + [2]
        kept = [x for x in labels if x != IGNORE_INDEX]
        if policy == "right":
            assert kept and kept == target_ids[: len(kept)]
        else:  # the target is always whole, the prompt keeps its BOS and its end
            assert kept == target_ids and ids[-len(target_ids):] == target_ids
            assert ids[0] == 1 or n == len(target_ids)


def test_collator_rejects_unknown_policies_and_lengths():
    for kwargs in ({"truncation": "middle"}, {"max_length": 1}, {"max_length": 0}):
        kind, result = _outcome("collator truncation", "bad collator args", MultiTaskCollator, CharTokenizer(), ["t"],
                                **kwargs)
        assert kind == "ValueError(mtpeft)", result


# --- adapters on disk -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    mtpeft.get_mt_model(tiny_model(), mtpeft.MTLLoRAConfig(tasks=["a", "b"], r=4)).save_pretrained(folder)
    return folder


def _copy_adapter(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_a_pickle_renamed_to_safetensors_is_refused_not_unpickled(tmp_path, saved_adapter):
    folder = _copy_adapter(saved_adapter, tmp_path / "evil")
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (folder / "adapter_model.safetensors").write_bytes(pickle.dumps({"x": Boom()}))
    with pytest.raises(AdapterLoadError, match=r"adapter_model\.safetensors.*not a valid safetensors file"):
        MTModel.from_pretrained(tiny_model(), folder)
    assert not marker.exists()  # never unpickled
    torch.save({"x": torch.zeros(1)}, folder / "adapter_model.safetensors")  # a torch.save zip archive
    with pytest.raises(AdapterLoadError, match="not a valid safetensors file"):
        MTModel.from_pretrained(tiny_model(), folder)


@FUZZ
@given(garbage=st.binary(max_size=64), keep=st.integers(0, 400))
def test_fuzz_corrupt_adapter_weights(tmp_path_factory, saved_adapter, garbage, keep):
    INPUTS["adapter weights on disk"] += 1
    folder = _copy_adapter(saved_adapter, tmp_path_factory.mktemp("corrupt"))
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:keep] + garbage)  # truncated and/or garbage
    kind, result = _outcome("adapter weights on disk", "", MTModel.from_pretrained, tiny_model(), folder)
    if kind != "ok":
        assert isinstance(result, AdapterLoadError) and str(weights) in str(result), result


@FUZZ
@given(record=json_values | st.fixed_dictionaries({"adapter": json_values | method_mappings(SMALL)},
                                                  optional={"base_model": json_values}),
       raw=st.none() | st.binary(max_size=30))
def test_fuzz_adapter_config_file(tmp_path_factory, saved_adapter, record, raw):
    INPUTS["adapter config file"] += 1
    folder = _copy_adapter(saved_adapter, tmp_path_factory.mktemp("cfg"))
    config_file = folder / "mtpeft_config.json"
    if raw is not None:
        config_file.write_bytes(raw)
    else:
        config_file.write_text(json.dumps(record))
    kind, result = _outcome("adapter config file", "raw bytes" if raw is not None else "json",
                            MTModel.from_pretrained, tiny_model(), folder)
    if kind != "ok":
        assert isinstance(result, AdapterLoadError) and str(folder) in str(result), result


def test_unknown_adapter_config_keys_and_another_base_say_what_differs(tmp_path, saved_adapter):
    folder = _copy_adapter(saved_adapter, tmp_path / "a")
    config_file = folder / "mtpeft_config.json"
    record = json.loads(config_file.read_text())
    record["adapter"]["rank_dropout"] = 0.1
    config_file.write_text(json.dumps(record))
    with pytest.raises(AdapterLoadError, match=r"unknown key\(s\) \['rank_dropout'\] for method 'mtl_lora'"):
        MTModel.from_pretrained(tiny_model(), folder)

    folder = _copy_adapter(saved_adapter, tmp_path / "b")
    import transformers as tf

    other = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=48,
                                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(AdapterLoadError) as info:
        MTModel.from_pretrained(other, folder)
    assert "hidden_size: adapter 32 vs base 64" in str(info.value)
    assert "num_hidden_layers: adapter 2 vs base 3" in str(info.value)


def test_trust_remote_code_is_off_unless_asked_for(monkeypatch):
    import transformers

    from mtpeft.base_models import load_base_model, load_tokenizer

    seen: list[dict[str, Any]] = []

    class Stop(Exception):
        pass

    def capture(*args, **kwargs):
        seen.append(kwargs)
        raise Stop

    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification,
                 transformers.AutoTokenizer):
        monkeypatch.setattr(auto, "from_pretrained", capture)
    for call in (lambda: load_base_model("org/model"), lambda: load_tokenizer("org/model"),
                 lambda: load_base_model("org/model", task="sequence_classification")):
        with pytest.raises(Stop):
            call()
    assert [kw["trust_remote_code"] for kw in seen] == [False, False, False]
    with pytest.raises(Stop):
        load_base_model("org/model", trust_remote_code=True)
    assert seen[-1]["trust_remote_code"] is True
    assert run_config_from_dict({"tasks": ["demo"]}).model.trust_remote_code is False


def test_zz_every_fuzz_test_ran_its_examples():
    """The tally is the count of bad inputs tried (printed at the end of the module with -s)."""
    fuzzed = {k: sum(v.values()) for k, v in TALLY.items()}
    assert all(n > 0 for n in fuzzed.values()), fuzzed
