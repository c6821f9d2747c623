"""Presets for the shared data: names, specs, and (where ../shared/data exists) loading every task."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mtpeft.data.presets import (
    BBH_TASKS,
    COMMONSENSE_TASKS,
    GLUE_TASKS,
    MATH_TASKS,
    available_presets,
    bbh_task,
    preset,
    presets,
)
from mtpeft.data.tasks import load_task


def data_root() -> Path | None:
    env = os.environ.get("MTPEFT_DATA_ROOT")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return root if root.is_dir() else None


ROOT = data_root()
needs_data = pytest.mark.skipif(
    ROOT is None,
    reason="shared data folder not found (../shared/data beside the repo, or $MTPEFT_DATA_ROOT)",
)


def test_preset_names_and_lookup() -> None:
    names = available_presets()
    for group in ("bbh27", "bbh", "glue", "commonsense", "math", "demo"):
        assert group in names
    assert "bbh:boolean_expressions" in names and "glue:cola" in names and "math:gsm8k" in names
    assert len(BBH_TASKS) == 27 and len(preset("bbh27")) == 27
    assert [s.name for s in preset("glue")] == list(GLUE_TASKS)
    assert [s.name for s in preset("commonsense")] == list(COMMONSENSE_TASKS)
    assert [s.name for s in preset("math")] == list(MATH_TASKS)
    one = preset("bbh:navigate", data_root="/data")
    assert len(one) == 1 and one[0].source == str(Path("/data") / "bbh/bbh/navigate.json")
    assert preset("bbh:navigate")[0].source == "bbh/bbh/navigate.json"  # relative without a root
    with pytest.raises(ValueError, match=r"unknown preset 'bbh28'; available groups"):
        preset("bbh28")
    with pytest.raises(ValueError, match=r"unknown task 'navigat' in preset group 'bbh'"):
        preset("bbh:navigat")
    with pytest.raises(ValueError, match=r"repeat task names \['navigate'\]"):
        presets(["bbh:navigate", "bbh"])


def test_bbh_spec_matches_anchor_protocol() -> None:
    s = bbh_task("navigate")
    assert (s.prompt, s.target, s.metric, s.seed) == ("Q: {input}\nA:", " {target}", "bbh", 0)
    assert s.test_size == pytest.approx(1 / 3) and s.test_size_max == 100


@needs_data
def test_all_27_bbh_tasks_load_with_anchor_split_sizes() -> None:
    train = evals = 0
    for spec in preset("bbh27", ROOT):
        d = load_task(spec)
        n = len(d.train) + len(d.eval)
        assert len(d.eval) == min(100, n // 3), spec.name
        assert all(e.prompt.startswith("Q: ") and e.prompt.endswith("\nA:") for e in d.eval)
        assert all(e.target.startswith(" ") and e.label == e.target.strip() for e in d.train)
        train += len(d.train)
        evals += len(d.eval)
    assert (train, evals) == (4350, 2161)  # docs/anchors.md


@needs_data
def test_bbh_split_is_deterministic_and_disjoint() -> None:
    a = load_task(bbh_task("web_of_lies", ROOT))
    b = load_task(bbh_task("web_of_lies", ROOT))
    assert [e.prompt for e in a.eval] == [e.prompt for e in b.eval]
    assert {e.meta["index"] for e in a.train}.isdisjoint({e.meta["index"] for e in a.eval})


@needs_data
def test_glue_tasks_load() -> None:
    expected = {
        "cola": (8551, 1043),
        "sst2": (67349, 872),
        "mrpc": (3667, 408),
        "stsb": (5749, 1500),
        "rte": (2490, 277),
        "wnli": (635, 71),
    }
    for spec in preset("glue", ROOT):
        if spec.name == "sst2":
            spec.max_train = 1000  # keep the test fast; the cap is a seeded subsample
        d = load_task(spec)
        n_train, n_eval = expected[spec.name]
        assert len(d.eval) == n_eval, spec.name
        assert len(d.train) == (1000 if spec.name == "sst2" else n_train), spec.name
        if spec.type == "classification":
            assert all(e.label in spec.labels for e in d.train + d.eval)
            assert {e.label for e in d.eval} == set(spec.labels), spec.name
    cola = load_task(preset("glue:cola", ROOT)[0])
    assert cola.train[0].prompt.startswith("Sentence: Our friends won't buy this analysis")
    assert cola.train[0].label == "yes"


@needs_data
def test_commonsense_and_math_tasks_load() -> None:
    for spec in preset("commonsense", ROOT) + preset("math", ROOT):
        d = load_task(spec)
        assert d.train and d.eval, spec.name
        for e in d.eval:
            if spec.type == "multiple_choice":
                assert e.label in e.options, spec.name
            else:
                assert float(e.label) == float(e.label), spec.name  # a clean number
    boolq = load_task(preset("commonsense:boolq", ROOT)[0])
    assert (len(boolq.train), len(boolq.eval)) == (9427, 3270)
    assert boolq.eval[0].options == ["true", "false"]
    piqa = load_task(preset("commonsense:piqa", ROOT)[0])
    assert len(piqa.eval) == 1838 // 3 and len(piqa.train) == 1838 - 1838 // 3
    gsm = load_task(preset("math:gsm8k", ROOT)[0])
    assert all("." not in e.label for e in gsm.eval if e.label.endswith("0"))  # "576.0" -> "576"
