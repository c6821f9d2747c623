"""What a benchmark invocation asks for: the methods and baselines, seeds, budget, policies and ``--set`` items."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import BenchError
from ..registry import available_methods
from ..training.run_config import parse_override

#: The baselines that are not adapter methods (``peft_lora``: Hugging Face PEFT's LoRA on the ``lora`` run's config,
#: :mod:`mtpeft.bench.peft_baseline`).
BASELINES: tuple[str, ...] = ("untrained", "single_task_lora", "peft_lora")
#: The multi-task methods benchmarked by default (in report order).
DEFAULT_METHODS: tuple[str, ...] = (
    "lora",
    "align_lora",
    "thanora",
    "mtlora",
    "hydralora",
    "mtl_lora",
    "moe_lora",
    "ta_lora",
)
UNSEEN_POLICIES: tuple[str, ...] = ("auto", "first_task", "skip")
SINGLE_TASK_STEPS: tuple[str, ...] = ("split", "same")


@dataclass
class BenchOptions:
    """What a benchmark invocation asks for (besides the suite).

    Attributes:
        methods: method names and baselines (see :func:`validate_methods`).
        seeds: training seeds; each (setting, method) runs once per seed.
        param_budget: target trainable parameters per method (None: every method at its default rank).
        steps: optimizer steps (of the largest setting for ``bbh-scaling``); None: the suite's.
        overrides: ``--set`` items: ``train.lr=1e-4`` applies to every run, ``method.dropout=0`` to every
            method, ``methods.<name>.<key>=v`` to one method only.
        single_task_steps: 'split' or 'same' (see :mod:`mtpeft.bench.runner`).
        unseen_policy: one of :data:`UNSEEN_POLICIES`.
        top_layers: adapt only the top k layers (overrides the suite's; 0 = every layer; None: the suite's).
        model: base model name or path (overrides the suite's).
        data_root: data folder (overrides ``$MTPEFT_DATA_ROOT``).
        scaling_steps: 'per_task' or 'fixed' for suites with settings of different sizes (None: the suite's).
        progress: progress bars while training and evaluating.
        fail_fast: stop at the first failed run instead of recording it and going on.
        max_rank: the largest rank the parameter-budget search tries.
    """

    methods: list[str] = field(default_factory=lambda: [*DEFAULT_METHODS, *BASELINES])
    seeds: list[int] = field(default_factory=lambda: [0])
    param_budget: int | None = None
    steps: int | None = None
    overrides: list[str] = field(default_factory=list)
    single_task_steps: str = "split"
    unseen_policy: str = "auto"
    top_layers: int | None = None
    model: str | None = None
    data_root: str | None = None
    scaling_steps: str | None = None
    progress: bool = False
    fail_fast: bool = False
    max_rank: int = 1024

    def check(self) -> None:
        """Validate the options; errors name the option and the allowed values."""
        self.methods = validate_methods(self.methods)
        if not self.seeds:
            raise BenchError("seeds must not be empty")
        if self.single_task_steps not in SINGLE_TASK_STEPS:
            raise BenchError(
                f"single_task_steps must be one of {list(SINGLE_TASK_STEPS)}, got {self.single_task_steps!r}"
            )
        if self.unseen_policy not in UNSEEN_POLICIES:
            raise BenchError(f"unseen_policy must be one of {list(UNSEEN_POLICIES)}, got {self.unseen_policy!r}")
        if self.param_budget is not None and self.param_budget <= 0:
            raise BenchError(f"param_budget must be a positive number of parameters, got {self.param_budget}")
        if self.steps is not None and self.steps <= 0:
            raise BenchError(f"steps must be positive, got {self.steps}")
        if self.top_layers is not None and self.top_layers < 0:
            raise BenchError(f"top_layers must be >= 0 (0 = every layer), got {self.top_layers}")
        split_overrides(self.overrides, self.methods)  # validates the method names in methods.<name>.<key>


def validate_methods(methods: Sequence[str] | str) -> list[str]:
    """Check method names (comma-separated string or list); unknown names raise listing the allowed ones."""
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    methods = list(dict.fromkeys(methods))
    allowed = [*available_methods(), *BASELINES]
    unknown = [m for m in methods if m not in allowed]
    if unknown:
        raise BenchError(f"unknown method(s) {unknown}; allowed: {allowed}")
    if not methods:
        raise BenchError(f"no methods given; allowed: {allowed}")
    return methods


def split_overrides(overrides: Sequence[str], methods: Sequence[str] = ()) -> tuple[list[str], dict[str, list[str]]]:
    """Split ``--set`` items into those for every run and ``methods.<name>.<key>=v`` ones per method."""
    general: list[str] = []
    per_method: dict[str, list[str]] = {}
    allowed = [*available_methods(), *BASELINES]
    for item in overrides or []:
        path, _ = parse_override(item)
        if path[0] == "methods":
            if len(path) < 3 or path[1] not in allowed:
                raise BenchError(
                    f"--set {item!r}: expected methods.<method>.<key>=value with <method> one of {allowed}"
                )
            per_method.setdefault(path[1], []).append("method." + item.split(".", 2)[2])
        else:
            general.append(item)
    return general, per_method


def method_order(methods: Sequence[str] | set[str], preferred: Sequence[str] = ()) -> list[str]:
    """``methods`` in report order: the baselines, then ``preferred``, then :data:`DEFAULT_METHODS`, then the
    rest by name."""
    order = [*BASELINES, *preferred, *DEFAULT_METHODS]
    rank = {m: i for i, m in enumerate(dict.fromkeys(order))}
    return sorted(set(methods), key=lambda m: (rank.get(m, len(rank)), m))
