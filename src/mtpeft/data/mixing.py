"""Deterministic, resumable multi-task batch sampling.

:class:`MixtureSampler` yields batches of ``(task_index, example_index)`` pairs. Each task's examples
are visited in a fresh seeded permutation per pass, so every example is seen once per pass of its
task. Which task each batch slot draws from is decided by a random generator keyed on
``(seed, batch number)``; together with the per-task positions this makes the whole stream a function
of the seed, and :meth:`MixtureSampler.state_dict` captures the exact position in a few integers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence, Sized
from typing import Any, TypeVar

import numpy as np

__all__ = ["STRATEGIES", "MixtureSampler", "mixture_probabilities", "batch_examples", "leading_batches"]

#: Allowed sampling strategies.
STRATEGIES: tuple[str, ...] = ("proportional", "temperature", "uniform")

T = TypeVar("T")


def mixture_probabilities(
    sizes: Sequence[int], strategy: str = "proportional", temperature: float = 1.0
) -> list[float]:
    """Task sampling probabilities.

    ``proportional``: p_t ∝ n_t; ``temperature``: p_t ∝ n_t^(1/T) (T=1 is proportional, large T tends
    to uniform); ``uniform``: p_t = 1/K over tasks with examples. Tasks with no examples get 0.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown mixing strategy {strategy!r}; allowed: {list(STRATEGIES)}")
    if not sizes:
        raise ValueError("no tasks to mix")
    if any(n < 0 for n in sizes):
        raise ValueError(f"task sizes must be >= 0, got {list(sizes)}")
    if sum(sizes) == 0:
        raise ValueError("every task is empty")
    if strategy == "uniform":
        weights = [1.0 if n > 0 else 0.0 for n in sizes]
    elif strategy == "proportional":
        weights = [float(n) for n in sizes]
    else:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        weights = [n ** (1.0 / temperature) if n > 0 else 0.0 for n in sizes]
    total = sum(weights)
    return [w / total for w in weights]


class MixtureSampler:
    """Sample multi-task batches of ``(task_index, example_index)``.

    Args:
        sizes: per task, its number of examples (or the example list itself).
        batch_size: examples per batch.
        strategy: ``"proportional"``, ``"temperature"`` or ``"uniform"`` (see :func:`mixture_probabilities`).
        temperature: T for the ``temperature`` strategy.
        task_balanced: if set to k, every batch holds exactly k examples of every task (grouped by task);
            ``batch_size`` must equal ``k * num_tasks``. The strategy is then irrelevant.
        single_task_batches: each batch draws all its slots from one task (chosen with the strategy's
            probabilities), for methods that want one task per batch.
        seed: the whole stream is a function of the seed.
        num_batches: batches per epoch; default ``ceil(total examples / batch_size)``.

    Iterating yields the rest of the current epoch (so ``for epoch ...: for batch in sampler:`` works,
    and resumes mid-epoch after :meth:`load_state_dict`); :meth:`stream` is an endless generator.
    """

    def __init__(
        self,
        sizes: Sequence[int | Sized],
        batch_size: int,
        *,
        strategy: str = "proportional",
        temperature: float = 1.0,
        task_balanced: int | None = None,
        single_task_batches: bool = False,
        seed: int = 0,
        num_batches: int | None = None,
    ) -> None:
        self.sizes = [int(s) if isinstance(s, (int, np.integer)) else len(s) for s in sizes]  # type: ignore[arg-type]
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.strategy = strategy
        self.temperature = float(temperature)
        self.probabilities = mixture_probabilities(self.sizes, strategy, temperature)
        self.task_balanced = task_balanced
        self.single_task_batches = bool(single_task_batches)
        if task_balanced is not None:
            k = len(self.sizes)
            if task_balanced < 1:
                raise ValueError(f"task_balanced must be >= 1, got {task_balanced}")
            if single_task_batches:
                raise ValueError("task_balanced and single_task_batches exclude each other")
            if batch_size != task_balanced * k:
                raise ValueError(
                    f"task_balanced={task_balanced} with {k} tasks needs batch_size={task_balanced * k} "
                    f"(k * num_tasks), got batch_size={batch_size}"
                )
            empty = [t for t, n in enumerate(self.sizes) if n == 0]
            if empty:
                raise ValueError(
                    f"task_balanced batches need examples in every task; tasks {empty} are empty"
                )
        self.seed = int(seed)
        total = sum(self.sizes)
        self.num_batches = int(num_batches) if num_batches is not None else math.ceil(total / self.batch_size)
        if self.num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {self.num_batches}")
        self._batch = 0
        self._cursor = [0] * len(self.sizes)
        self._pass = [0] * len(self.sizes)
        self._perm: list[np.ndarray | None] = [None] * len(self.sizes)

    # ------------------------------------------------------------------------------------- stream

    @property
    def num_tasks(self) -> int:
        """Number of tasks."""
        return len(self.sizes)

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to (``batches drawn // num_batches``)."""
        return self._batch // self.num_batches

    @property
    def batches_drawn(self) -> int:
        """Batches drawn so far (over all epochs)."""
        return self._batch

    def __len__(self) -> int:
        return self.num_batches

    def _permutation(self, t: int) -> np.ndarray:
        perm = self._perm[t]
        if perm is None:
            rng = np.random.default_rng([self.seed, 0x7A5C, t, self._pass[t]])
            perm = rng.permutation(self.sizes[t])
            self._perm[t] = perm
        return perm

    def _next_index(self, t: int) -> int:
        if self.sizes[t] == 0:  # unreachable: such tasks have probability 0
            raise RuntimeError(f"task {t} has no examples")
        idx = int(self._permutation(t)[self._cursor[t]])
        self._cursor[t] += 1
        if self._cursor[t] == self.sizes[t]:
            self._cursor[t] = 0
            self._pass[t] += 1
            self._perm[t] = None
        return idx

    def _batch_tasks(self, b: int) -> list[int]:
        if self.task_balanced is not None:
            return [t for t in range(self.num_tasks) for _ in range(self.task_balanced)]
        rng = np.random.default_rng([self.seed, 0xB47C, b])
        if self.single_task_batches:
            return [int(rng.choice(self.num_tasks, p=self.probabilities))] * self.batch_size
        return [int(t) for t in rng.choice(self.num_tasks, size=self.batch_size, p=self.probabilities)]

    def next_batch(self) -> list[tuple[int, int]]:
        """Draw the next batch: a list of ``(task_index, example_index)``."""
        tasks = self._batch_tasks(self._batch)
        batch = [(t, self._next_index(t)) for t in tasks]
        self._batch += 1
        return batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        end = (self.epoch + 1) * self.num_batches
        while self._batch < end:
            yield self.next_batch()

    def stream(self, num_batches: int | None = None) -> Iterator[list[tuple[int, int]]]:
        """Yield batches without epoch boundaries: forever, or ``num_batches`` of them."""
        n = 0
        while num_batches is None or n < num_batches:
            yield self.next_batch()
            n += 1

    # -------------------------------------------------------------------------------------- state

    def _config(self) -> dict[str, Any]:
        return {
            "sizes": list(self.sizes),
            "batch_size": self.batch_size,
            "strategy": self.strategy,
            "temperature": self.temperature,
            "task_balanced": self.task_balanced,
            "single_task_batches": self.single_task_batches,
            "seed": self.seed,
            "num_batches": self.num_batches,
        }

    def state_dict(self) -> dict[str, Any]:
        """The exact stream position (plain ints and lists; JSON-serializable) plus the configuration."""
        return {
            "batch": self._batch,
            "cursors": list(self._cursor),
            "passes": list(self._pass),
            "config": self._config(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the position saved by :meth:`state_dict`.

        Raises:
            ValueError: the state was saved by a sampler with a different configuration (the
                differing key is named) or is malformed.
        """
        try:
            config, batch, cursors, passes = (
                state["config"],
                state["batch"],
                state["cursors"],
                state["passes"],
            )
        except (KeyError, TypeError):
            raise ValueError(
                "not a MixtureSampler state: needs keys 'batch', 'cursors', 'passes', 'config'"
            ) from None
        mine = self._config()
        for key, value in mine.items():
            if config.get(key) != value:
                raise ValueError(
                    f"sampler state was saved with {key}={config.get(key)!r}, "
                    f"but this sampler has {key}={value!r}"
                )
        if len(cursors) != self.num_tasks or len(passes) != self.num_tasks:
            raise ValueError(f"sampler state has {len(cursors)} task cursors, expected {self.num_tasks}")
        for t, (c, n) in enumerate(zip(cursors, self.sizes)):
            if not 0 <= c < max(n, 1):
                raise ValueError(f"sampler state: cursor {c} of task {t} is out of range for {n} examples")
        self._batch = int(batch)
        self._cursor = [int(c) for c in cursors]
        self._pass = [int(p) for p in passes]
        self._perm = [None] * self.num_tasks


def batch_examples(batch: Sequence[tuple[int, int]], per_task: Sequence[Sequence[T]]) -> list[T]:
    """Look up a sampler batch: ``[per_task[t][i] for t, i in batch]``."""
    return [per_task[t][i] for t, i in batch]


def leading_batches(per_task: Sequence[Sequence[T]], batch_size: int, count: int) -> list[list[T]]:
    """The first ``count`` batches of every task's examples in order, one task after another (calibration data);
    a task with fewer examples gives fewer batches."""
    return [list(chunk) for examples in per_task for b in range(count)
            if (chunk := examples[b * batch_size:(b + 1) * batch_size])]
