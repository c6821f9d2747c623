"""The built-in demo suite: deterministic, disjoint, heterogeneous, short answers."""

from __future__ import annotations

import pytest

from mtpeft.data.builtin import DEMO_TASKS, demo_specs, demo_tasks
from mtpeft.data.tasks import TaskSpec, load_task


def test_demo_suite_shape() -> None:
    suite = demo_tasks(seed=0, n_train=60, n_eval=20)
    assert len(suite) >= 4
    types = {spec.type for spec, _ in suite}
    assert types == {"generation", "classification", "multiple_choice"}
    for spec, data in suite:
        assert spec.source == f"builtin:{spec.name}"
        assert (len(data.train), len(data.eval)) == (60, 20)
        assert {e.prompt for e in data.train}.isdisjoint({e.prompt for e in data.eval}), spec.name
        for e in data.train + data.eval:
            assert e.target.startswith(" ") and 1 <= len(e.label.split()) <= 3
            if spec.type != "generation":
                assert e.label in e.options


def test_demo_deterministic_and_seeded() -> None:
    a = demo_tasks(seed=1, n_train=10, n_eval=5)
    b = demo_tasks(seed=1, n_train=10, n_eval=5)
    c = demo_tasks(seed=2, n_train=10, n_eval=5)
    prompts = [[e.prompt for e in d.train + d.eval] for _, d in a]
    assert prompts == [[e.prompt for e in d.train + d.eval] for _, d in b]
    assert prompts != [[e.prompt for e in d.train + d.eval] for _, d in c]


def test_demo_answers_are_right() -> None:
    suite = dict((s.name, d) for s, d in demo_tasks(n_train=30, n_eval=0))
    for e in suite["arithmetic"].train:
        a, b = e.prompt.removeprefix("Add: ").removesuffix("=").split("+")
        assert int(e.label) == int(a) + int(b)
    for e in suite["reverse"].train:
        words = e.prompt.split(": ", 1)[1].split("\n")[0].split()
        assert e.label.split() == words[::-1]
    for e in suite["extract"].train:
        assert e.label in e.prompt
    labels = {e.label for e in suite["sentiment"].train}
    assert labels == {"positive", "negative"}


def test_builtin_source_through_load_task_and_yaml_roundtrip() -> None:
    spec = TaskSpec.from_dict(demo_specs(seed=3, n_train=8, n_eval=4, names=["arithmetic"])[0].to_dict())
    d = load_task(spec)
    assert (len(d.train), len(d.eval)) == (8, 4)
    with pytest.raises(ValueError, match=r"unknown builtin task 'nope'"):
        load_task(TaskSpec(name="x", source="builtin:nope"))
    with pytest.raises(ValueError, match="set max_train/max_eval instead"):
        load_task(TaskSpec(name="x", source="builtin:arithmetic", test_size=5))
    with pytest.raises(ValueError, match=r"unknown demo task\(s\) \['nope'\]"):
        demo_specs(names=["nope"])
    assert set(DEMO_TASKS) >= {"sentiment", "arithmetic", "reverse", "extract"}
