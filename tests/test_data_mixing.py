"""MixtureSampler: strategy statistics, task-balanced batches, determinism and exact resume."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from mtpeft.data.mixing import MixtureSampler, batch_examples, mixture_probabilities


def task_fractions(sampler: MixtureSampler, n_batches: int) -> list[float]:
    counts: Counter[int] = Counter()
    for batch in sampler.stream(n_batches):
        counts.update(t for t, _ in batch)
    total = sum(counts.values())
    return [counts[t] / total for t in range(sampler.num_tasks)]


def test_probabilities() -> None:
    assert mixture_probabilities([100, 300], "proportional") == pytest.approx([0.25, 0.75])
    assert mixture_probabilities([100, 400], "temperature", 2.0) == pytest.approx([10 / 30, 20 / 30])
    assert mixture_probabilities([1, 99, 0], "uniform") == pytest.approx([0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match=r"unknown mixing strategy 'zipf'; allowed: \['proportional'"):
        mixture_probabilities([1], "zipf")


@pytest.mark.parametrize(
    ("strategy", "temperature", "expected"),
    [("proportional", 1.0, [0.25, 0.75]), ("temperature", 2.0, [1 / 3, 2 / 3]), ("uniform", 1.0, [0.5, 0.5])],
)
def test_strategy_statistics(strategy: str, temperature: float, expected: list[float]) -> None:
    sampler = MixtureSampler(
        [100, 400] if strategy == "temperature" else [100, 300],
        batch_size=16,
        strategy=strategy,
        temperature=temperature,
        seed=1,
    )
    # 16 * 600 = 9600 draws: the binomial standard deviation is under 0.005
    assert task_fractions(sampler, 600) == pytest.approx(expected, abs=0.02)


def test_every_example_once_per_pass() -> None:
    sampler = MixtureSampler([7, 5], batch_size=4, task_balanced=2)
    seen: dict[int, list[int]] = {0: [], 1: []}
    for batch in sampler.stream(35):  # 70 draws per task = 10 passes of task 0, 14 of task 1
        for t, i in batch:
            seen[t].append(i)
    for t, n in ((0, 7), (1, 5)):
        passes = [seen[t][k : k + n] for k in range(0, len(seen[t]), n)]
        assert all(sorted(p) == list(range(n)) for p in passes)
        assert len({tuple(p) for p in passes}) > 1  # reshuffled between passes


def test_task_balanced_batches() -> None:
    sampler = MixtureSampler([10, 3, 50], batch_size=6, task_balanced=2, seed=0)
    for batch in sampler.stream(20):
        assert [t for t, _ in batch] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(
        ValueError, match=r"task_balanced=2 with 3 tasks needs batch_size=6 .*got batch_size=8"
    ):
        MixtureSampler([10, 3, 50], batch_size=8, task_balanced=2)
    with pytest.raises(ValueError, match=r"tasks \[1\] are empty"):
        MixtureSampler([10, 0], batch_size=2, task_balanced=1)


def test_single_task_batches() -> None:
    sampler = MixtureSampler([10, 30], batch_size=4, single_task_batches=True, strategy="uniform")
    tasks = [{t for t, _ in b} for b in sampler.stream(50)]
    assert all(len(s) == 1 for s in tasks)
    assert {next(iter(s)) for s in tasks} == {0, 1}


def test_epochs_and_len() -> None:
    sampler = MixtureSampler([10, 6], batch_size=4)
    assert len(sampler) == 4  # ceil(16 / 4)
    first = list(sampler)
    assert len(first) == 4 and sampler.epoch == 1
    second = list(sampler)
    assert len(second) == 4 and second != first and sampler.batches_drawn == 8
    fixed = MixtureSampler([10, 6], batch_size=4, num_batches=3)
    assert len(list(fixed)) == 3


def test_deterministic_given_seed() -> None:
    a = list(MixtureSampler([20, 30, 5], batch_size=8, seed=7).stream(30))
    b = list(MixtureSampler([20, 30, 5], batch_size=8, seed=7).stream(30))
    c = list(MixtureSampler([20, 30, 5], batch_size=8, seed=8).stream(30))
    assert a == b and a != c


@pytest.mark.parametrize(
    "kwargs", [{}, {"strategy": "temperature", "temperature": 3.0}, {"task_balanced": 3}]
)
def test_resume_equals_uninterrupted(kwargs: dict) -> None:
    sizes = [13, 29, 4]
    bs = 9
    full = MixtureSampler(sizes, bs, seed=5, **kwargs)
    reference = list(full.stream(40))

    first = MixtureSampler(sizes, bs, seed=5, **kwargs)
    head = list(first.stream(17))
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = MixtureSampler(sizes, bs, seed=5, **kwargs)
    resumed.load_state_dict(state)
    tail = list(resumed.stream(23))
    assert head + tail == reference


def test_resume_mid_epoch_iteration() -> None:
    ref = MixtureSampler([11, 7], 4, seed=2)
    ref_epochs = [list(ref) for _ in range(3)]
    s = MixtureSampler([11, 7], 4, seed=2)
    it = iter(s)
    got = [next(it), next(it)]
    state = s.state_dict()
    s2 = MixtureSampler([11, 7], 4, seed=2)
    s2.load_state_dict(state)
    got += list(s2)  # the rest of epoch 0
    assert got == ref_epochs[0]
    assert [list(s2), list(s2)] == ref_epochs[1:]


def test_load_state_dict_rejects_other_config() -> None:
    state = MixtureSampler([5, 5], 2, seed=1).state_dict()
    with pytest.raises(ValueError, match=r"saved with seed=1, but this sampler has seed=2"):
        MixtureSampler([5, 5], 2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="not a MixtureSampler state"):
        MixtureSampler([5, 5], 2).load_state_dict({"batch": 0})


def test_batch_examples_lookup() -> None:
    per_task = [["a0", "a1"], ["b0"]]
    assert batch_examples([(1, 0), (0, 1)], per_task) == ["b0", "a1"]
    sampler = MixtureSampler(per_task, batch_size=3)
    assert sampler.sizes == [2, 1]
