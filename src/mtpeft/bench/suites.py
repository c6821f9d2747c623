"""Benchmark suites: which tasks are trained and evaluated together, in which settings, with which run config.

A :class:`Suite` holds one or more :class:`SuiteSetting` (a list of training tasks plus tasks evaluated only,
"unseen") and the run-config sections (``model``, ``data``, ``train``, ``eval``) that every method shares.
Every method of a benchmark is trained on the same data, for the same steps, and evaluated the same way.

Built-in suites over the benchmark data (under ``$MTPEFT_DATA_ROOT`` or ``--data-root``), each in a full (GPU)
and a ``quick`` (CPU, SmolLM2-135M, minutes per run) variant:

* ``bbh27``: the 27 BIG-Bench-Hard tasks, each split train/test with seed 0 (test = min(100, n // 3)), trained
  as one mixture. Quick: 5 BBH tasks with short inputs.
* ``bbh-scaling``: the same tasks in nested settings of 5, 15 and 27 tasks (the first 5 are the quick tasks,
  then a fixed seed-0 order), to see whether a method degrades as tasks are added. By default the steps grow
  with the number of tasks (``steps = train.steps * n / n_max``: every task gets the same number of
  training samples in expectation); ``scaling_steps='fixed'`` keeps the same steps for every setting.
  Quick: 2, 3 and 5 of the quick tasks.
* ``glue``: CoLA, SST-2, MRPC, STS-B, RTE, WNLI (train.tsv -> dev.tsv). Quick: SST-2, CoLA, RTE, MRPC.
* ``commonsense``: train on BoolQ, ARC-e, ARC-c and OBQA; PIQA, SIQA and WinoGrande are evaluated as unseen
  tasks (see ``UNSEEN_POLICIES`` in :mod:`mtpeft.bench.options`).

:func:`custom_suite` builds a suite from inline task specs (tests, your own tasks).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..data.presets import BBH_TASKS
from ..errors import SuiteError

#: BBH tasks with short inputs and short answers (the quick setting and the first 5 of ``bbh-scaling``).
QUICK_BBH_TASKS: tuple[str, ...] = (
    "boolean_expressions",
    "sports_understanding",
    "hyperbaton",
    "web_of_lies",
    "object_counting",
)
#: Task counts of the ``bbh-scaling`` settings (full / quick).
SCALING_COUNTS: tuple[int, ...] = (5, 15, 27)
QUICK_SCALING_COUNTS: tuple[int, ...] = (2, 3, 5)
#: Layers that carry adapters in the quick setting (the top ones: backward stops early on CPU).
QUICK_TOP_LAYERS = 4

SUITES: tuple[str, ...] = ("bbh27", "bbh-scaling", "glue", "commonsense")
SCALING_STEPS: tuple[str, ...] = ("per_task", "fixed")


@dataclass
class SuiteSetting:
    """One training setting of a suite.

    Attributes:
        name: folder-safe name (``all``, ``tasks-5``...).
        tasks: run-config task entries (preset names such as ``bbh:navigate`` or task-spec mappings) trained
            as one mixture.
        unseen: task entries evaluated only (never trained on).
        steps: the optimizer steps of this setting (None: the suite's ``train.steps``).
    """

    name: str
    tasks: list[Any]
    unseen: list[Any] = field(default_factory=list)
    steps: int | None = None

    @property
    def task_names(self) -> list[str]:
        """The training tasks' names (a preset ``group:task`` gives ``task``)."""
        return [entry_name(t) for t in self.tasks]

    @property
    def unseen_names(self) -> list[str]:
        """The unseen tasks' names."""
        return [entry_name(t) for t in self.unseen]

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)


@dataclass
class Suite:
    """A benchmark suite: settings plus the run-config sections every method shares.

    Attributes:
        name: the suite name (``bbh27``, ``custom``...).
        description: one line for the report.
        settings: the training settings (one for most suites, several for ``bbh-scaling``).
        config: run-config sections ``model``, ``data``, ``train``, ``eval`` (no ``tasks``, ``method`` or
            ``output_dir``: the runner fills those in).
        top_layers: adapt only the top ``k`` transformer layers (``layers_to_transform``, TA-LoRA
            included); None adapts every layer.
        quick: whether this is the reduced CPU variant.
        core_tasks: tasks shared by every setting (``bbh-scaling``: the first 5), averaged separately.
        scaling_steps: how the settings' steps were derived from ``train.steps`` ('per_task' or 'fixed').
    """

    name: str
    description: str
    settings: list[SuiteSetting]
    config: dict[str, Any]
    top_layers: int | None = None
    quick: bool = False
    core_tasks: list[str] = field(default_factory=list)
    scaling_steps: str = "fixed"

    def setting(self, name: str) -> SuiteSetting:
        """The setting called ``name``."""
        for s in self.settings:
            if s.name == name:
                return s
        raise SuiteError(f"suite {self.name!r} has no setting {name!r}; settings: {[s.name for s in self.settings]}")


def entry_name(entry: Any) -> str:
    """The task name of a run-config task entry: a preset ``'bbh:navigate'`` -> ``'navigate'``, a mapping's
    ``name``."""
    if isinstance(entry, str):
        return entry.split(":", 1)[1] if ":" in entry else entry
    if isinstance(entry, dict) and isinstance(entry.get("name"), str):
        return entry["name"]
    raise SuiteError(
        f"a task entry must be a preset name ('bbh:navigate') or a task-spec mapping with a 'name', got {entry!r}"
    )


def scaling_order() -> list[str]:
    """The BBH task order of ``bbh-scaling``: the 5 quick tasks, then the rest shuffled with seed 0."""
    rest = [t for t in BBH_TASKS if t not in QUICK_BBH_TASKS]
    random.Random(0).shuffle(rest)
    return [*QUICK_BBH_TASKS, *rest]


# ------------------------------------------------------------------------------------------- configs
def _sections(
    max_length: int,
    steps: int,
    *,
    mixing: str,
    batch_size: int,
    lr: float,
    warmup_ratio: float,
    precision: str,
    save_every: int,
    log_every: int,
    max_new_tokens: int,
    data: dict[str, Any],
) -> dict[str, Any]:
    """The run-config sections every method of a suite shares."""
    return {
        "model": {"name": "smollm2", "dtype": "float32"},
        "data": {"max_length": max_length, "truncation": "left", "mixing": mixing, **data},
        "train": {
            "steps": steps,
            "batch_size": batch_size,
            "grad_accum": 1,
            "lr": lr,
            "warmup_ratio": warmup_ratio,
            "schedule": "cosine",
            "precision": precision,
            "save_every": save_every,
            "keep_checkpoints": 1,
            "log_every": log_every,
            "eval_every": 0,
        },
        "eval": {"batch_size": 32, "max_new_tokens": max_new_tokens, "before_training": False},
    }


#: What the full (GPU) and the quick (CPU) variants train with, besides lengths, steps and caps.
_GPU_TRAINING: dict[str, Any] = {
    "mixing": "proportional", "lr": 2e-4, "warmup_ratio": 0.03, "precision": "bf16", "save_every": 100, "log_every": 10
}
_CPU_TRAINING: dict[str, Any] = {
    "mixing": "uniform", "lr": 1e-3, "warmup_ratio": 0.05, "precision": "fp32", "save_every": 25, "log_every": 5
}


def _gpu_sections(
    max_length: int,
    steps: int,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 24,
    max_eval: int | None = None,
    **data: Any,
) -> dict[str, Any]:
    """The full variant: bf16, lr 2e-4, proportional mixing, every training example."""
    data = {"max_eval_per_task": max_eval, **data}
    return _sections(
        max_length, steps, batch_size=batch_size, max_new_tokens=max_new_tokens, data=data, **_GPU_TRAINING
    )


def _cpu_sections(
    max_length: int, steps: int, *, max_eval: int = 30, max_new_tokens: int = 5, **data: Any
) -> dict[str, Any]:
    """The quick CPU variant: fp32, lr 1e-3, uniform mixing, 200 training examples per task."""
    data = {"max_train_per_task": 200, "max_eval_per_task": max_eval, **data}
    return _sections(max_length, steps, batch_size=8, max_new_tokens=max_new_tokens, data=data, **_CPU_TRAINING)


def _builtin_suite(name: str, description: str, settings: list[SuiteSetting], quick: bool, **kwargs: Any) -> Suite:
    """A built-in suite: the quick variant adapts only the top :data:`QUICK_TOP_LAYERS` layers."""
    return Suite(name, description, settings, top_layers=QUICK_TOP_LAYERS if quick else None, quick=quick, **kwargs)


def _bbh_sections(quick: bool) -> dict[str, Any]:
    return _cpu_sections(64, 60) if quick else _gpu_sections(512, 544, max_new_tokens=64)


def _bbh27(quick: bool) -> Suite:
    names = list(QUICK_BBH_TASKS) if quick else list(BBH_TASKS)
    desc = (
        "BIG-Bench-Hard, each task split train/test with seed 0 (test = min(100, n // 3)), trained as one "
        f"{len(names)}-task mixture"
    )
    setting = SuiteSetting("all", [f"bbh:{n}" for n in names])
    return _builtin_suite("bbh27", desc, [setting], quick, config=_bbh_sections(quick))


def _bbh_scaling(quick: bool) -> Suite:
    order = list(QUICK_BBH_TASKS) if quick else scaling_order()
    counts = QUICK_SCALING_COUNTS if quick else SCALING_COUNTS
    settings = [SuiteSetting(f"tasks-{n}", [f"bbh:{t}" for t in order[:n]]) for n in counts]
    desc = (
        f"BIG-Bench-Hard with {', '.join(map(str, counts))} tasks (nested: every setting contains the "
        "previous one): does a method degrade as tasks are added?"
    )
    return _builtin_suite(
        "bbh-scaling", desc, settings, quick, config=_bbh_sections(quick), core_tasks=order[: counts[0]]
    )


def _glue(quick: bool) -> Suite:
    if quick:
        names = ["sst2", "cola", "rte", "mrpc"]
        cfg = _cpu_sections(96, 60, max_eval=40)
    else:
        names = ["cola", "sst2", "mrpc", "stsb", "rte", "wnli"]
        cfg = _gpu_sections(256, 1000, max_new_tokens=8, mixing="temperature", temperature=2.0, max_train_per_task=5000)
    desc = "GLUE (train.tsv -> dev.tsv); classification by option log-likelihood, STS-B as score generation"
    return _builtin_suite("glue", desc, [SuiteSetting("all", [f"glue:{n}" for n in names])], quick, config=cfg)


def _commonsense(quick: bool) -> Suite:
    train = ["boolq", "arc_easy", "arc_challenge", "obqa"]
    unseen = ["piqa", "siqa", "winogrande"]
    if quick:
        cfg = _cpu_sections(160, 60, max_eval=30)
    else:
        cfg = _gpu_sections(384, 1000, max_new_tokens=8, max_eval=1000, task_balanced=4)
    desc = (
        "commonsense reasoning (LLM-Adapters files): trained on BoolQ, ARC-e, ARC-c, OBQA; PIQA, SIQA and "
        "WinoGrande evaluated as unseen tasks"
    )
    setting = SuiteSetting("all", [f"commonsense:{n}" for n in train], [f"commonsense:{n}" for n in unseen])
    return _builtin_suite("commonsense", desc, [setting], quick, config=cfg)


_BUILDERS = {"bbh27": _bbh27, "bbh-scaling": _bbh_scaling, "glue": _glue, "commonsense": _commonsense}


def available_suites() -> list[str]:
    """The built-in suite names."""
    return list(SUITES)


def get_suite(name: str, *, quick: bool = False, scaling_steps: str = "per_task") -> Suite:
    """The built-in suite ``name`` (see :data:`SUITES`), full (GPU) or ``quick`` (CPU).

    ``scaling_steps`` ('per_task' or 'fixed') only matters for suites with several settings of different
    sizes (``bbh-scaling``): 'per_task' gives a setting of n tasks ``round(steps * n / n_max)`` steps.

    Raises:
        SuiteError: unknown suite (the message lists the suites) or unknown ``scaling_steps``.
    """
    if name not in _BUILDERS:
        raise SuiteError(
            f"unknown suite {name!r}; available suites: {available_suites()} "
            f"(or build one from task specs with mtpeft.bench.custom_suite)"
        )
    suite = _BUILDERS[name](quick)
    return apply_scaling_steps(suite, scaling_steps)


def apply_scaling_steps(suite: Suite, policy: str) -> Suite:
    """Set every setting's steps under ``policy`` ('per_task': proportional to its task count; 'fixed')."""
    if policy not in SCALING_STEPS:
        raise SuiteError(f"scaling_steps must be one of {list(SCALING_STEPS)}, got {policy!r}")
    steps = int(suite.config.get("train", {}).get("steps", 100))
    largest = max(s.num_tasks for s in suite.settings)
    suite.scaling_steps = policy
    for s in suite.settings:
        s.steps = max(1, round(steps * s.num_tasks / largest)) if policy == "per_task" else steps
    return suite


def custom_suite(
    tasks: Sequence[Any],
    config: dict[str, Any],
    *,
    name: str = "custom",
    unseen: Sequence[Any] = (),
    description: str = "",
    top_layers: int | None = None,
    settings: Sequence[SuiteSetting] | None = None,
) -> Suite:
    """A suite from inline task entries (task-spec mappings or preset names) and run-config sections.

    ``config`` may hold ``model``, ``data``, ``train`` and ``eval`` (as in a run config); with ``settings``
    given, ``tasks``/``unseen`` are ignored and several settings are benchmarked.
    """
    allowed = {"model", "data", "train", "eval"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise SuiteError(f"custom suite config has unknown section(s) {unknown}; allowed: {sorted(allowed)}")
    if settings is None:
        if not tasks:
            raise SuiteError("a custom suite needs at least one task")
        settings = [SuiteSetting("all", list(tasks), list(unseen))]
    settings = [copy.deepcopy(s) for s in settings]
    for s in settings:
        names = s.task_names + s.unseen_names
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SuiteError(f"setting {s.name!r} repeats task names {dup}")
        if s.steps is None:
            s.steps = int(config.get("train", {}).get("steps", 100))
    return Suite(
        name,
        description or f"custom suite of {len(settings[0].tasks)} tasks",
        list(settings),
        copy.deepcopy(dict(config)),
        top_layers=top_layers,
    )
