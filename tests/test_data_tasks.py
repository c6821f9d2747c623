"""TaskSpec validation, (de)serialization, templating, label checks and split policies."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from mtpeft.data.loaders import DataFormatError
from mtpeft.data.tasks import Example, TaskSpec, TaskSpecError, load_task, load_tasks, template_fields


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def qa_rows(n: int) -> list[dict]:
    return [{"input": f"question {i}", "target": f"answer {i}"} for i in range(n)]


# --------------------------------------------------------------------------------------- validation


def test_spec_defaults_and_metric_default() -> None:
    s = TaskSpec(name="t", source="x.jsonl")
    assert s.type == "generation" and s.metric == "exact_match"
    c = TaskSpec(name="c", source="x.jsonl", type="classification", target=" {label}", labels=["a", "b"])
    assert c.metric == "accuracy"


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"name": ""}, "non-empty"),
        ({"type": "regression"}, r"unknown task type 'regression'; allowed types: \['generation', "),
        ({"metric": "bleu"}, r"unknown metric 'bleu'; allowed metrics: \[.*'exact_match'"),
        ({"extra_metrics": ["nope"]}, "unknown metric 'nope'"),
        ({"prompt": "Q: {input"}, "malformed template"),
        ({"prompt": "Q: {}"}, "positional field"),
        ({"test_size": 0}, "test_size must be >= 1"),
        ({"test_size": 1.5}, r"test_size must be in \(0, 1\)"),
        ({"test_size": 0.2, "eval_split": "dev"}, "not both"),
        ({"type": "classification", "target": " {label}"}, "needs labels"),
        ({"type": "multiple_choice", "target": " {label}"}, "needs options"),
        ({"type": "multiple_choice", "options": ["a", "b"], "target": " {x} {y}"}, "set label_field"),
        ({"transform": "nope"}, "unknown transform 'nope'"),
        ({"label_map": {"0": "a"}, "target": "{x}{y}"}, "set label_field"),
        ({"max_train": -1}, "max_train must be"),
    ],
)
def test_spec_validation_errors(kwargs: dict, pattern: str) -> None:
    base = {"name": "t", "source": "x.jsonl"}
    with pytest.raises(TaskSpecError, match=pattern):
        TaskSpec(**{**base, **kwargs})


def test_label_map_defines_labels_and_must_fit_them() -> None:
    s = TaskSpec(
        name="s", source="x.tsv", type="classification", target=" {label}", label_map={"0": "neg", "1": "pos"}
    )
    assert s.labels == ["neg", "pos"] and s.resolved_positive_label() == "pos"
    with pytest.raises(TaskSpecError, match=r"label_map values \['pos'\] are not in labels"):
        TaskSpec(
            name="s",
            source="x",
            type="classification",
            target=" {l}",
            labels=["neg", "x"],
            label_map={"1": "pos"},
        )


def test_to_dict_from_dict_roundtrip_and_unknown_key() -> None:
    s = TaskSpec(
        name="cola",
        source="glue/CoLA/train.tsv",
        eval_source="glue/CoLA/dev.tsv",
        type="classification",
        prompt="S: {sentence}\nOK?",
        target=" {label}",
        label_map={"0": "no", "1": "yes"},
        metric="mcc",
        columns=["a", "label", "c", "sentence"],
        tsv_header=False,
    )
    d = s.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert TaskSpec.from_dict(d) == s
    with pytest.raises(TaskSpecError) as ei:
        TaskSpec.from_dict({**d, "promt": "typo"})
    msg = str(ei.value)
    assert "unknown key(s) ['promt']" in msg and "allowed keys" in msg and "'prompt'" in msg
    with pytest.raises(TaskSpecError, match=r"missing required key\(s\) \['source'\]"):
        TaskSpec.from_dict({"name": "x"})


def test_template_fields() -> None:
    assert template_fields("Q: {input}\n{ctx.x} {input} {{literal}}") == ["input", "ctx"]


# ------------------------------------------------------------------------------------------ loading


def test_load_generation_task_with_fixed_seed_split(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "qa.jsonl", qa_rows(30))
    spec = TaskSpec(name="qa", source="qa.jsonl", prompt="Q: {input}\nA:", test_size=10, seed=3)
    data = load_task(spec, data_root=tmp_path)
    assert len(data.train) == 20 and len(data.eval) == 10
    ex = data.eval[0]
    assert isinstance(ex, Example) and ex.prompt.startswith("Q: question ") and ex.prompt.endswith("\nA:")
    assert ex.target.startswith(" answer ") and ex.label == ex.target.strip() == ex.reference
    assert ex.meta["line"] == int(ex.prompt.split()[2].rstrip("\nA:")) + 1  # 1-based line of the record
    assert {e.prompt for e in data.train}.isdisjoint({e.prompt for e in data.eval})
    again = load_task(spec, data_root=tmp_path)
    assert [e.prompt for e in again.eval] == [e.prompt for e in data.eval]  # deterministic
    other = load_task(TaskSpec(**{**spec.to_dict(), "seed": 4}), data_root=tmp_path)
    assert [e.prompt for e in other.eval] != [e.prompt for e in data.eval]


def test_fraction_split_cap_and_max_caps(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "qa.jsonl", qa_rows(250))
    spec = TaskSpec(name="qa", source="qa.jsonl", test_size=1 / 3, test_size_max=100)
    d = load_task(spec, tmp_path)
    assert (len(d.train), len(d.eval)) == (167, 83)  # n // 3
    capped = TaskSpec(name="qa", source="qa.jsonl", test_size=0.5, test_size_max=20, max_train=7, max_eval=5)
    d = load_task(capped, tmp_path)
    assert (len(d.train), len(d.eval)) == (7, 5)


def test_explicit_eval_source_and_split_keyed_json(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", qa_rows(5))
    write_jsonl(tmp_path / "dev.jsonl", qa_rows(2))
    d = load_task(TaskSpec(name="qa", source="train.jsonl", eval_source="dev.jsonl"), tmp_path)
    assert (len(d.train), len(d.eval)) == (5, 2)
    (tmp_path / "both.json").write_text(json.dumps({"train": qa_rows(4), "validation": qa_rows(3)}))
    d = load_task(TaskSpec(name="qa", source="both.json", eval_split="validation"), tmp_path)
    assert (len(d.train), len(d.eval)) == (4, 3)
    d = load_task(TaskSpec(name="qa", source=str(tmp_path / "train.jsonl")))  # absolute path, no root
    assert (len(d.train), len(d.eval)) == (5, 0)


def test_missing_template_field_names_task_file_line_field(tmp_path: Path) -> None:
    rows = qa_rows(3)
    rows[1] = {"question": "q", "target": "t"}
    p = write_jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(DataFormatError) as ei:
        load_task(TaskSpec(name="myqa", source="qa.jsonl"), tmp_path)
    msg = str(ei.value)
    for part in (
        "task 'myqa'",
        str(p),
        "line 2",
        "field 'input'",
        "available fields: ['question', 'target']",
    ):
        assert part in msg


def test_classification_label_outside_set_names_file_line_value(tmp_path: Path) -> None:
    p = tmp_path / "sst.tsv"
    p.write_text("sentence\tlabel\ngood film\tpositive\nbad film\tnegative\nodd film\tneutral\n")
    spec = TaskSpec(
        name="sst",
        source="sst.tsv",
        type="classification",
        prompt="{sentence}\nSentiment:",
        target=" {label}",
        labels=["negative", "positive"],
    )
    with pytest.raises(DataFormatError) as ei:
        load_task(spec, tmp_path)
    msg = str(ei.value)
    assert f"{p} line 4" in msg and "'neutral'" in msg and "label set ['negative', 'positive']" in msg


def test_label_map_and_field_renames(tmp_path: Path) -> None:
    (tmp_path / "mrpc.tsv").write_text("Quality\t#1 String\t#2 String\n1\ta b\ta  b\n0\tx\ty\n")
    spec = TaskSpec(
        name="mrpc",
        source="mrpc.tsv",
        type="classification",
        prompt="{s1} / {s2}\nSame?",
        target=" {label}",
        fields={"s1": "#1 String", "s2": "#2 String", "label": "Quality"},
        label_map={"0": "no", "1": "yes"},
    )
    d = load_task(spec, tmp_path)
    ex0, ex1 = d.train
    assert ex0.prompt == "a b / a  b\nSame?" and ex0.target == " yes" and ex0.label == "yes"
    assert ex0.options == ["no", "yes"] and ex0.option_targets == [" no", " yes"]
    assert ex1.label == "no"
    (tmp_path / "bad.tsv").write_text("Quality\t#1 String\t#2 String\n2\ta\tb\n")
    with pytest.raises(DataFormatError, match=r"bad.tsv line 2.*label '2'.*label_map keys \['0', '1'\]"):
        load_task(TaskSpec(**{**spec.to_dict(), "source": "bad.tsv"}), tmp_path)


def test_multiple_choice_options_field_and_answer_check(tmp_path: Path) -> None:
    rows = [
        {"q": "pick b", "opts": ["a", "b", "c"], "ans": "b"},
        {"q": "pick z", "opts": ["a", "b"], "ans": "z"},
    ]
    write_jsonl(tmp_path / "mc.jsonl", rows)
    spec = TaskSpec(
        name="mc",
        source="mc.jsonl",
        type="multiple_choice",
        prompt="{q}:",
        target=" {ans}",
        options_field="opts",
        max_train=1,
    )
    with pytest.raises(DataFormatError, match=r"mc.jsonl line 2.*answer 'z'.*not one of the options"):
        load_task(spec, tmp_path)
    write_jsonl(tmp_path / "mc.jsonl", rows[:1])
    ex = load_task(spec, tmp_path).train[0]
    assert ex.options == ["a", "b", "c"] and ex.label == "b" and ex.option_targets == [" a", " b", " c"]


def test_transform_llm_adapters_options(tmp_path: Path) -> None:
    rows = [
        {
            "instruction": "Q?\n\nAnswer1: x Answer2: y\n\nAnswer format: answer1/answer2",
            "input": "",
            "output": "the correct answer is answer2",
            "answer": "answer2",
        }
    ]
    (tmp_path / "t.json").write_text(json.dumps(rows))
    spec = TaskSpec(
        name="arc",
        source="t.json",
        type="multiple_choice",
        prompt="{instruction}\nAnswer:",
        target=" {answer}",
        options_field="options",
        transform="llm_adapters_options",
    )
    ex = load_task(spec, tmp_path).train[0]
    assert ex.options == ["answer1", "answer2"] and ex.label == "answer2"
    (tmp_path / "t.json").write_text(json.dumps([{**rows[0], "instruction": "no format line"}]))
    with pytest.raises(
        DataFormatError, match=r"t.json line 1 \(record 0\): transform 'llm_adapters_options'"
    ):
        load_task(spec, tmp_path)


def test_missing_file_lists_tried_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found; tried .*absent.jsonl"):
        load_task(TaskSpec(name="t", source="absent.jsonl"), tmp_path)


def test_huggingface_source_via_monkeypatched_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load_dataset(name, subset=None, split=None):  # noqa: ANN001, ANN202
        calls.append((name, subset, split))
        n = 6 if split == "train" else 2
        return [{"sentence": f"{split} {i}", "label": i % 2} for i in range(n)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    spec = TaskSpec(
        name="sst2",
        source="nyu-mll/glue",
        subset="sst2",
        eval_split="validation",
        type="classification",
        prompt="{sentence}",
        target=" {label}",
        label_map={"0": "negative", "1": "positive"},
    )
    d = load_task(spec)
    assert calls == [("nyu-mll/glue", "sst2", "train"), ("nyu-mll/glue", "sst2", "validation")]
    assert (len(d.train), len(d.eval)) == (6, 2) and d.train[1].label == "positive"
    assert d.eval[0].meta["source"] == "hf:nyu-mll/glue/sst2[validation]"


def test_load_tasks_rejects_duplicate_names(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "qa.jsonl", qa_rows(3))
    s = TaskSpec(name="qa", source="qa.jsonl")
    with pytest.raises(TaskSpecError, match=r"duplicate task names: \['qa'\]"):
        load_tasks([s, s], tmp_path)
