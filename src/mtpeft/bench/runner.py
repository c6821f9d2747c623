"""The benchmark runner: every method (and two baselines) on the same data, steps and evaluation.

A *run* is one (setting, method, seed). Its run config is the suite's shared sections plus the setting's
tasks and steps plus the method's config from :data:`METHOD_DEFAULTS` (and ``--set`` overrides); it is trained
with :class:`mtpeft.training.trainer.Trainer`, which evaluates every training task at the end. Unseen tasks (the
``commonsense`` suite) are evaluated afterwards under the unseen-task policy.

Folder layout under the bench folder ``OUT``::

    OUT/bench.json                                   the invocation (suite, methods, seeds, options)
    OUT/runs/<setting>/<method>/seed-<k>/result.json  a finished run (present = done; skipped on re-runs)
    OUT/runs/<setting>/<method>/seed-<k>/run/          the Trainer's run folder (run_config.yaml, adapter/...)
    OUT/runs/<setting>/<method>/seed-<k>/error.json    a failed run (retried on the next invocation)
    OUT/report.md, OUT/report.json, OUT/plots/*.png    written by :mod:`mtpeft.bench.report`

Conventions (also in ``benchmarks/README.md``):

* **Same everything.** Every method sees the suite's data, mixing, steps, batch size, learning rate,
  schedule and evaluation; only the ``method`` section differs. ``alpha = 2 r`` for every method (so the
  LoRA scale alpha / r stays 2 when the rank changes), unless ``alpha`` is overridden.
* **Parameter budget** (``param_budget``): each method's rank ``r`` is chosen so that its trainable
  parameters come closest to the budget (binary search over r on a meta-device copy of the base model: no
  weights are loaded or allocated); all other method keys stay at their defaults. Single-task LoRA shares the
  budget among its T adapters (each gets budget / T).
* **Baselines.** ``untrained``: the base model without adapters (deterministic: one run, whatever the seeds).
  ``single_task_lora``: one LoRA (the ``lora`` defaults) per training task, trained on that task only, with
  ``ceil(steps / T)`` steps each (``single_task_steps='split'``: the same total compute as one multi-task
  run) or ``steps`` each (``'same'``); each task is evaluated with its own adapter.
* **Unseen tasks** (:data:`UNSEEN_POLICIES`): ``auto`` evaluates methods that need no task id at inference
  without one (MoE-LoRA's task gate then uses its learned "unknown task" row), methods that need one
  (MTL-LoRA, TA-LoRA) and single-task LoRA with task id 0 / the first task's adapter; ``first_task`` gives
  every method task id 0; ``skip`` evaluates unseen tasks only for methods that need no task id.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import importlib.metadata
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, available_methods, config_from_dict, get_method
from ..errors import BenchError
from ..training.run_config import RunConfigError, apply_overrides, parse_override, run_config_from_dict
from .suites import Suite, SuiteSetting, apply_scaling_steps

#: The baselines that are not adapter methods.
BASELINES: tuple[str, ...] = ("untrained", "single_task_lora")
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
RESULT_NAME = "result.json"
ERROR_NAME = "error.json"

#: Sensible per-method defaults (rank 8 everywhere; alpha = 2 r is added by the runner). Chosen from the
#: papers' and the examples' settings; ``--set methods.<name>.<key>=value`` changes one method's key.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"r": 8, "dropout": 0.05},
    # MMD, not the KL default: the KL estimates each task's variances from the 1-2 samples a task has in a mixed
    # batch, and in the quick BBH setting it reached 1e4-1e5 and swamped the LM loss; the MMD is bounded
    "align_lora": {"r": 8, "dropout": 0.05, "align_loss": "mmd", "align_weight": 0.01},
    # r is raised to the number of tasks when smaller (ThanoRA needs >= 1 rank per task)
    "thanora": {
        "r": 8,
        "dropout": 0.05,
        "complexity": "activations",
        "block_init": "data",
        "ortho_weight": 0.01,
    },
    # routing_group_size 'auto' = hidden_size / 2 (two routing groups, as the paper's 2048 of 4096)
    "mtlora": {
        "r": 8,
        "dropout": 0.05,
        "num_experts": 16,
        "block_type": "ffn",
        "routing_group_size": "auto",
        "spectral_mode": "released",
        "spectral_weight": 1.0,
        "balance_weight": 0.01,
    },
    "hydralora": {"r": 8, "dropout": 0.05, "num_experts": 4, "balance_weight": 0.0},
    "mtl_lora": {"r": 8, "dropout": 0.05, "num_up_projections": 3, "temperature": 0.1},
    "moe_lora": {"r": 8, "dropout": 0.05, "num_experts": 4, "gating": "task"},
    "ta_lora": {"r": 8, "dropout": 0.05, "prompt_length": 10, "slow_lr_scale": 0.1},
}


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
        single_task_steps: 'split' or 'same' (see the module docstring).
        unseen_policy: one of :data:`UNSEEN_POLICIES`.
        top_layers: adapt only the top k layers (overrides the suite's; 0 = every layer; None: the suite's).
        model: base model name or path (overrides the suite's).
        data_root: data folder (overrides ``$MTPEFT_DATA_ROOT`` / ``../shared/data``).
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


@dataclass
class RunSpec:
    """One planned run: where it goes and its validated run-config mapping."""

    setting: str
    method: str
    seed: int
    run_dir: Path
    config: dict[str, Any]
    unseen: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rank: int | None = None
    planned_parameters: int | None = None

    @property
    def key(self) -> str:
        return f"{self.setting}/{self.method}/seed-{self.seed}"

    @property
    def done(self) -> bool:
        """Whether the run finished (its result JSON exists)."""
        return (self.run_dir / RESULT_NAME).is_file()


# ------------------------------------------------------------------------------------------- methods
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


def method_defaults(method: str) -> dict[str, Any]:
    """A copy of the method's default config (``{"method": name, ...}``); unknown names list the methods."""
    if method == "single_task_lora":
        method = "lora"
    get_method(method)  # unknown -> ConfigError listing the methods
    return {"method": method, **copy.deepcopy(METHOD_DEFAULTS.get(method, {"r": 8}))}


@lru_cache(maxsize=8)
def _model_config(name: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    from ..base_models import resolve_model_path

    return AutoConfig.from_pretrained(resolve_model_path(name), trust_remote_code=trust_remote_code)


def _num_layers(model_config: Any) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(model_config, key, None):
            return int(getattr(model_config, key))
    raise BenchError(f"cannot tell the number of layers of {type(model_config).__name__} (needed by top_layers)")


def _resolve_auto(method_cfg: dict[str, Any], model_config: Any) -> None:
    if method_cfg.get("routing_group_size") == "auto":
        hidden = int(getattr(model_config, "hidden_size", 0) or 0)
        method_cfg["routing_group_size"] = hidden // 2 if hidden and hidden % 2 == 0 else None


def count_trainable_parameters(
    model_name: str, method_cfg: dict[str, Any], tasks: list[str], trust_remote_code: bool = False
) -> int:
    """Trainable parameters of ``method_cfg`` on ``model_name`` (built on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    from ..model import get_mt_model

    adapter_cfg = config_from_dict({**method_cfg, "tasks": list(tasks)})  # validate before building anything
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(
            _model_config(model_name, trust_remote_code), trust_remote_code=trust_remote_code
        )
    return get_mt_model(base, adapter_cfg).num_trainable_parameters()


def choose_rank(
    model_name: str,
    method_cfg: dict[str, Any],
    tasks: list[str],
    budget: int,
    *,
    max_rank: int = 1024,
    auto_alpha: bool = True,
    count: Callable[[dict[str, Any]], int] | None = None,
) -> tuple[int, int]:
    """The rank r whose trainable-parameter count comes closest to ``budget`` -> (r, parameters).

    Trainable parameters grow with r for every method, so a binary search finds the largest r within the
    budget; r + 1 is taken instead when it is closer. Ranks the method rejects (ThanoRA's r < number of tasks,
    MoE-LoRA's r < num_experts) are skipped; if even the smallest valid rank exceeds the budget it is used.
    """
    cache: dict[int, int | None] = {}

    def params(r: int) -> int | None:
        if r not in cache:
            cfg = {**method_cfg, "r": r}
            if auto_alpha:
                cfg["alpha"] = 2.0 * r
            try:
                cache[r] = count(cfg) if count is not None else count_trainable_parameters(model_name, cfg, tasks)
            except ConfigError:
                cache[r] = None
        return cache[r]

    lo = next((r for r in range(1, max_rank + 1) if params(r) is not None), None)
    if lo is None:
        raise BenchError(f"method {method_cfg.get('method')!r}: no rank in 1..{max_rank} gives a valid config")
    if params(lo) >= budget:  # type: ignore[operator]
        return lo, params(lo)  # type: ignore[return-value]
    hi = max_rank
    while params(hi) is None:
        hi -= 1
    if params(hi) <= budget:  # type: ignore[operator]
        return hi, params(hi)  # type: ignore[return-value]
    while hi - lo > 1:  # invariant: params(lo) <= budget < params(hi)
        mid = (lo + hi) // 2
        value = params(mid)
        if value is None or value <= budget:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda r: (abs(params(r) - budget), r))  # type: ignore[operator]
    return best, params(best)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------- run configs
def _entry_names(entries: Sequence[Any]) -> list[str]:
    from .suites import entry_name

    return [entry_name(e) for e in entries]


def build_method_config(
    method: str, suite: Suite, setting: SuiteSetting, options: BenchOptions, notes: list[str] | None = None
) -> tuple[dict[str, Any], int | None]:
    """The method section of a run (defaults, top layers, overrides, budget rank, alpha) and the planned
    trainable parameters (None without a budget)."""
    notes = notes if notes is not None else []
    general, per_method = split_overrides(options.overrides, options.methods)
    cfg = method_defaults(method)
    model_name = options.model or suite.config.get("model", {}).get("name", "smollm2")
    trust = bool(suite.config.get("model", {}).get("trust_remote_code", False))
    model_config = _model_config(model_name, trust)
    top = suite.top_layers if options.top_layers is None else (options.top_layers or None)
    if top:
        n_layers = _num_layers(model_config)
        window = list(range(max(0, n_layers - top), n_layers))
        if cfg["method"] == "ta_lora":
            cfg["prompt_layers"] = [i + 1 for i in window]
        else:
            cfg["layers_to_transform"] = window
    _resolve_auto(cfg, model_config)
    wrapper = {"method": cfg}
    apply_overrides(wrapper, [o for o in general if o.startswith("method.")])
    apply_overrides(wrapper, per_method.get(method, []))
    cfg = wrapper["method"]
    explicit = {parse_override(o)[0][-1] for o in [*general, *per_method.get(method, [])] if o.startswith("method.")}
    tasks = setting.task_names
    if cfg["method"] == "thanora" and "r" not in explicit and cfg["r"] < len(tasks):
        notes.append(f"ThanoRA rank raised from {cfg['r']} to {len(tasks)} (at least one rank per task)")
        cfg["r"] = len(tasks)
    planned = None
    if options.param_budget is not None:
        if "r" in explicit:
            raise BenchError(
                "--param-budget chooses each method's rank: do not also set method.r "
                f"(got an r override for {method!r})"
            )
        budget = options.param_budget
        per_adapter_tasks = tasks
        if method == "single_task_lora":
            budget = max(1, budget // len(tasks))
            per_adapter_tasks = tasks[:1]
        r, planned = choose_rank(
            model_name,
            cfg,
            per_adapter_tasks,
            budget,
            max_rank=options.max_rank,
            auto_alpha="alpha" not in explicit,
        )
        cfg["r"] = r
        if method == "single_task_lora":
            planned *= len(tasks)
        notes.append(f"rank {r} chosen for the budget of {options.param_budget:,} parameters ({planned:,} planned)")
    if "alpha" not in explicit:
        cfg["alpha"] = 2.0 * cfg["r"]
    return cfg, planned


def build_run_config(
    suite: Suite,
    setting: SuiteSetting,
    method: str,
    seed: int,
    run_dir: Path,
    options: BenchOptions,
    method_cfg: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The validated run-config mapping of one run (``to_dict`` of a RunConfig)."""
    general, _ = split_overrides(options.overrides, options.methods)
    data = copy.deepcopy(suite.config)
    data["tasks"] = copy.deepcopy(setting.tasks)
    data.setdefault("train", {})["seed"] = seed
    data["train"]["steps"] = setting.steps or data["train"].get("steps", 100)
    if options.model:
        data.setdefault("model", {})["name"] = options.model
    if options.data_root:
        data.setdefault("data", {})["root"] = str(options.data_root)
    data["method"] = method_cfg if method_cfg is not None else {"method": "lora"}
    data["output_dir"] = str(run_dir / "run")
    data["name"] = f"{suite.name}/{setting.name}/{method}/seed-{seed}"
    apply_overrides(data, [o for o in general if not o.startswith("method.")])
    try:
        return run_config_from_dict(data).to_dict()
    except RunConfigError as exc:
        raise BenchError(f"{data['name']}: {exc}") from exc


def plan_runs(suite: Suite, options: BenchOptions, out_dir: str | os.PathLike) -> list[RunSpec]:
    """Every run of the benchmark, in order: setting, then method, then seed (untrained: one run)."""
    options.check()
    if options.scaling_steps is not None or options.steps is not None:
        if options.steps is not None:
            suite.config.setdefault("train", {})["steps"] = options.steps
        apply_scaling_steps(suite, options.scaling_steps or suite.scaling_steps)
    out = Path(out_dir).resolve()
    runs: list[RunSpec] = []
    for setting in suite.settings:
        for method in options.methods:
            notes: list[str] = []
            method_cfg, planned = (
                (None, 0) if method == "untrained" else build_method_config(method, suite, setting, options, notes)
            )
            seeds = options.seeds[:1] if method == "untrained" else options.seeds
            for seed in seeds:
                run_dir = out / "runs" / setting.name / method / f"seed-{seed}"
                cfg = build_run_config(suite, setting, method, seed, run_dir, options, method_cfg)
                runs.append(
                    RunSpec(
                        setting.name,
                        method,
                        seed,
                        run_dir,
                        cfg,
                        list(setting.unseen),
                        list(notes),
                        None if method_cfg is None else method_cfg["r"],
                        planned,
                    )
                )
    return runs


# ------------------------------------------------------------------------------------------ provenance
def package_versions() -> dict[str, str | None]:
    """Versions of torch, transformers, peft, accelerate, mtpeft and Python."""
    from .. import __version__

    out: dict[str, str | None] = {}
    for pkg in ("torch", "transformers", "peft", "accelerate"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    out["mtpeft"] = __version__
    out["python"] = platform.python_version()
    return out


@lru_cache(maxsize=1)
def git_state() -> dict[str, Any]:
    """The git revision of the mtpeft source checkout and whether tracked files are modified (None outside
    a git checkout)."""
    root = Path(__file__).resolve().parents[3]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    rev = git("rev-parse", "HEAD")
    if rev is None:
        return {"revision": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"revision": rev, "dirty": bool(status) if status is not None else None}


def device_info() -> dict[str, Any]:
    """CPU/GPU description for the result JSON."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class PeakMemory:
    """Peak memory of one run: CPU max RSS (``resource.getrusage``; reset per run through
    ``/proc/self/clear_refs`` where Linux allows it, else the process peak so far) and
    ``torch.cuda.max_memory_allocated``."""

    def __init__(self) -> None:
        self.scope = "process"

    def reset(self) -> None:
        """Start measuring."""
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.scope = "run"
        except OSError:
            self.scope = "process"

    def read(self) -> dict[str, Any]:
        """The peaks since :meth:`reset` (MiB)."""
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss_mb = rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024
        out: dict[str, Any] = {
            "cpu_max_rss_mb": round(rss_mb, 1),
            "cpu_max_rss_scope": self.scope,
            "gpu_max_allocated_mb": None,
        }
        if torch.cuda.is_available():
            out["gpu_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out


# ----------------------------------------------------------------------------------------- evaluation
class FixedTaskIds(nn.Module):
    """Wraps a model for :func:`mtpeft.evaluation.evaluator.evaluate` and replaces the task ids it is given.

    ``task_id=None`` passes no task id (task-agnostic methods; MoE-LoRA's unknown-task gate); an int passes
    that id for every row; ``drop=True`` passes no ``task_ids`` keyword at all (a plain transformers model).
    """

    def __init__(self, model: nn.Module, task_id: int | None = None, drop: bool = False) -> None:
        super().__init__()
        self.inner = model
        self.task_id = task_id
        self.drop = drop

    def _kwargs(self, task_ids: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if self.drop:
            return kwargs
        if self.task_id is None or task_ids is None:
            return {**kwargs, "task_ids": None}
        ids = torch.full_like(task_ids, self.task_id) if isinstance(task_ids, torch.Tensor) else self.task_id
        return {**kwargs, "task_ids": ids}

    def forward(self, *args: Any, task_ids: Any = None, **kwargs: Any) -> Any:
        return self.inner(*args, **self._kwargs(task_ids, kwargs))

    def generate(self, *args: Any, task_ids: Any = None, **kwargs: Any) -> Any:
        return self.inner.generate(*args, **self._kwargs(task_ids, kwargs))


def task_metrics_dict(result: Any) -> dict[str, dict[str, Any]]:
    """An EvalResult as ``{task: {"metric", "score", "n", "metrics"}}``."""
    out = {}
    for task, metric in result.primary.items():
        values = dict(result.metrics[task])
        out[task] = {
            "metric": metric,
            "score": float(values[metric]),
            "n": int(values.get("n", 0)),
            "metrics": {k: float(v) for k, v in values.items() if k != "n"},
        }
    return out


def _macro(tasks: dict[str, dict[str, Any]]) -> float | None:
    scores = [t["score"] for t in tasks.values() if t["score"] is not None and not math.isnan(t["score"])]
    return sum(scores) / len(scores) if scores else None


def _micro(tasks: dict[str, dict[str, Any]]) -> float | None:
    total = sum(t["n"] for t in tasks.values())
    if not total:
        return None
    return sum(t["score"] * t["n"] for t in tasks.values()) / total


def _load_eval_examples(entries: Sequence[Any], cfg: Any, *, unseen: bool = False) -> list[tuple[Any, list[Any]]]:
    """(spec, eval examples) of task entries; an unseen task without an eval split is evaluated on all of its
    examples (capped by ``data.max_eval_per_task``), as nothing trains on it."""
    from ..data.tasks import load_task
    from ..training.trainer import resolve_task_specs

    if not entries:
        return []
    specs = resolve_task_specs(dataclasses.replace(cfg, tasks=list(entries)))
    out = []
    for spec in specs:
        data = load_task(spec, cfg.data.root)
        examples = list(data.eval)
        if unseen and not examples:
            examples = list(data.train)[: cfg.data.max_eval_per_task or None]
        out.append((spec, examples))
    return out


def evaluate_with(
    model: nn.Module, tokenizer: Any, tasks: list[tuple[Any, list[Any]]], cfg: Any, progress: bool = False
) -> dict[str, dict[str, Any]]:
    """Evaluate ``model`` (a FixedTaskIds wrapper) on (spec, examples) pairs; per-task metrics dict."""
    from ..evaluation.evaluator import evaluate

    tasks = [(s, e) for s, e in tasks if e]
    if not tasks:
        return {}
    device = next(model.parameters()).device
    result = evaluate(
        model,
        tokenizer,
        tasks,
        [s.name for s, _ in tasks],
        batch_size=cfg.eval.batch_size,
        max_new_tokens=cfg.eval.max_new_tokens,
        device=device,
        progress=progress,
    )
    return task_metrics_dict(result)


def unseen_task_id(method: str, policy: str) -> tuple[str, int | None]:
    """How unseen tasks are evaluated for ``method`` under ``policy`` -> (action, task id).

    action: 'none' (no task id), 'id' (task id 0 / the first task's adapter) or 'skip'.
    """
    if method == "untrained":
        return "none", None
    needs_id = method == "single_task_lora" or get_method(method).task_ids_at_inference
    if policy == "first_task":
        return "id", 0
    if not needs_id:
        return "none", None
    return ("skip", None) if policy == "skip" else ("id", 0)


def _describe_unseen(method: str, action: str, first_task: str) -> str:
    if action == "skip":
        return "skipped (the method needs a task id at inference)"
    if action == "none":
        if method == "moe_lora":
            return "no task id (MoE-LoRA's learned unknown-task gate)"
        return "no task id"
    if method == "single_task_lora":
        return f"the first task's adapter ({first_task})"
    return f"task id 0 ({first_task})"


# -------------------------------------------------------------------------------------------- running
def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str, allow_nan=True) + "\n")
    os.replace(tmp, path)


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two run-config mappings.

    ``output_dir`` is ignored, and so is a key of the model/data/train/eval sections that only one side has
    (those sections always hold every field, so such a key comes from a newer or older mtpeft, not from the
    benchmark's options).
    """
    a = {k: v for k, v in _flat(old).items() if k != "output_dir"}
    b = {k: v for k, v in _flat(new).items() if k != "output_dir"}

    def relevant(key: str) -> bool:
        return (key in a and key in b) or key.split(".", 1)[0] not in ("model", "data", "train", "eval")

    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if relevant(k) and json.dumps(a.get(k), default=str) != json.dumps(b.get(k), default=str)
    ]


class BenchRunner:
    """Runs the planned runs of one suite into a bench folder (skipping finished ones), then the report."""

    def __init__(
        self,
        suite: Suite,
        options: BenchOptions,
        out_dir: str | os.PathLike,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.suite = suite
        self.options = options
        self.out_dir = Path(out_dir).resolve()
        self.log = log or (lambda msg: print(msg, flush=True))
        self.runs = plan_runs(suite, options, self.out_dir)
        self.versions = package_versions()
        self.git = git_state()

    # --- bookkeeping ------------------------------------------------------------------------------
    def bench_record(self) -> dict[str, Any]:
        """What bench.json holds: the suite, settings, options and provenance."""
        return {
            "suite": self.suite.name,
            "description": self.suite.description,
            "quick": self.suite.quick,
            "settings": [
                {"name": s.name, "tasks": s.task_names, "unseen": s.unseen_names, "steps": s.steps}
                for s in self.suite.settings
            ],
            "core_tasks": self.suite.core_tasks,
            "scaling_steps": self.suite.scaling_steps,
            "options": dataclasses.asdict(self.options),
            "versions": self.versions,
            "git": self.git,
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def check_resumable(self) -> None:
        """Finished runs must have been made with the same run config; else stop naming the differences."""
        for spec in self.runs:
            if not spec.done:
                continue
            old = json.loads((spec.run_dir / RESULT_NAME).read_text()).get("config", {})
            changes = config_changes(old, spec.config)
            if changes:
                raise BenchError(
                    f"{spec.run_dir / RESULT_NAME} was made with a different run config "
                    f"({'; '.join(changes[:5])}"
                    f"{' ...' if len(changes) > 5 else ''}); use another output folder (--name/--output) or "
                    f"delete that run folder to rerun it"
                )

    def check_data(self) -> None:
        """Fail before any training when a task's data file is missing (FileNotFoundError naming it)."""
        from ..data.tasks import resolve_source
        from ..training.trainer import resolve_task_specs

        seen: set[str] = set()
        for spec in self.runs:
            if spec.done or spec.setting in seen:
                continue
            seen.add(spec.setting)
            cfg = run_config_from_dict(copy.deepcopy(spec.config))
            entries = [*spec.config["tasks"], *spec.unseen]
            for task in resolve_task_specs(dataclasses.replace(cfg, tasks=entries)):
                for source in (task.source, task.eval_source):
                    if source is not None:
                        resolve_source(source, cfg.data.root)

    def run(self) -> list[dict[str, Any]]:
        """Run every unfinished run; returns the results of all finished ones (old and new)."""
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        if not self.options.progress:
            hf_logging.disable_progress_bar()  # no "Loading weights" bar per run
        try:
            return self._run()
        finally:
            if bars:
                hf_logging.enable_progress_bar()

    def _run(self) -> list[dict[str, Any]]:
        self.check_resumable()
        self.check_data()
        _write_json(self.out_dir / "bench.json", self.bench_record())
        results: list[dict[str, Any]] = []
        todo = [r for r in self.runs if not r.done]
        self.log(
            f"bench {self.suite.name}{' (quick)' if self.suite.quick else ''}: {len(self.runs)} runs, "
            f"{len(self.runs) - len(todo)} already finished -> {self.out_dir}"
        )
        for i, spec in enumerate(self.runs, 1):
            if spec.done:
                results.append(json.loads((spec.run_dir / RESULT_NAME).read_text()))
                continue
            self.log(
                f"[{i}/{len(self.runs)}] {spec.key}: running" + (f" ({'; '.join(spec.notes)})" if spec.notes else "")
            )
            try:
                result = self.execute(spec)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # record, go on with the other runs
                _write_json(
                    spec.run_dir / ERROR_NAME,
                    {
                        "setting": spec.setting,
                        "method": spec.method,
                        "seed": spec.seed,
                        "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc(),
                        "config": spec.config,
                        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    },
                )
                self.log(
                    f"[{i}/{len(self.runs)}] {spec.key}: FAILED ({type(exc).__name__}: {exc}); "
                    f"details in {spec.run_dir / ERROR_NAME}"
                )
                if self.options.fail_fast:
                    raise
                continue
            (spec.run_dir / ERROR_NAME).unlink(missing_ok=True)
            _write_json(spec.run_dir / RESULT_NAME, result)
            results.append(result)
            macro = result.get("macro")
            self.log(
                f"[{i}/{len(self.runs)}] {spec.key}: done in {result['wall_time_s'] / 60:.1f} min, macro "
                f"{'n/a' if macro is None else f'{100 * macro:.1f}%'}, "
                f"{result['trainable_parameters']:,} trainable parameters"
            )
        return results

    # --- one run --------------------------------------------------------------------------------------
    def _base_result(self, spec: RunSpec) -> dict[str, Any]:
        return {
            "suite": self.suite.name,
            "setting": spec.setting,
            "method": spec.method,
            "seed": spec.seed,
            "quick": self.suite.quick,
            "config": spec.config,
            "notes": list(spec.notes),
            "rank": spec.rank,
            "param_budget": self.options.param_budget,
            "planned_parameters": spec.planned_parameters,
            "single_task_steps": self.options.single_task_steps if spec.method == "single_task_lora" else None,
            "unseen_policy": self.options.unseen_policy,
            "versions": self.versions,
            "git": self.git,
            "device": device_info(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def execute(self, spec: RunSpec) -> dict[str, Any]:
        """Run one planned run and return its result record (not yet written)."""
        record = self._base_result(spec)
        gc.collect()  # the previous run's model, so that it does not count in this run's peak memory
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        peak = PeakMemory()
        peak.reset()
        start = time.perf_counter()
        cpu_start = _cpu_seconds()
        if spec.method == "untrained":
            out = self._untrained(spec)
        elif spec.method == "single_task_lora":
            out = self._single_task(spec)
        else:
            out = self._train(spec.config, spec.method, spec.unseen)
        record.update(out)
        record["wall_time_s"] = round(time.perf_counter() - start, 2)
        record["cpu_time_s"] = round(_cpu_seconds() - cpu_start, 2)
        if spec.method == "single_task_lora" and out.get("subrun_peak_memory"):
            record["peak_memory"] = out.pop("subrun_peak_memory")
        else:
            record["peak_memory"] = peak.read()
        record["macro"] = _macro(record["tasks"])
        record["micro"] = _micro(record["tasks"])
        record["unseen_macro"] = _macro(record.get("unseen") or {}) if record.get("unseen") else None
        record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return record

    def _unseen(
        self, model: nn.Module, tokenizer: Any, cfg: Any, method: str, entries: list[Any], first_task: str
    ) -> tuple[dict[str, Any], str]:
        if not entries:
            return {}, ""
        action, tid = unseen_task_id(method, self.options.unseen_policy)
        how = _describe_unseen(method, action, first_task)
        if action == "skip":
            return {}, how
        wrapped = FixedTaskIds(model, tid, drop=method == "untrained")
        tasks = _load_eval_examples(entries, cfg, unseen=True)
        return evaluate_with(wrapped, tokenizer, tasks, cfg, self.options.progress), how

    def _train(self, config: dict[str, Any], method: str, unseen: list[Any]) -> dict[str, Any]:
        from ..training.trainer import Trainer

        cfg = run_config_from_dict(copy.deepcopy(config))
        trainer = Trainer(cfg, progress=self.options.progress)
        result = trainer.train(resume=True)
        tasks = task_metrics_dict(result.eval) if result.eval is not None else {}
        unseen, how = self._unseen(trainer.model, trainer.tokenizer, cfg, method, unseen, trainer.task_names[0])
        history = result.history[-1] if result.history else {}
        return {
            "tasks": tasks,
            "unseen": unseen,
            "unseen_how": how,
            "steps": result.steps,
            "final_loss": result.final_loss,
            "tokens_per_s": history.get("tokens_per_s"),
            "trainable_parameters": trainer.model.num_trainable_parameters(),
            "run_dir": str(Path(cfg.output_dir)),
        }

    def _untrained(self, spec: RunSpec) -> dict[str, Any]:
        from ..base_models import load_run_base_model, load_tokenizer

        cfg = run_config_from_dict(copy.deepcopy(spec.config))
        tokenizer = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
        base = load_run_base_model(cfg.model)
        device = cfg.train.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if cfg.model.quantization is None:  # a quantized model was placed on load and cannot move
            base.to(device)
        base.eval()
        model = FixedTaskIds(base, drop=True)
        tasks = _load_eval_examples(cfg.tasks, cfg)
        metrics = evaluate_with(model, tokenizer, tasks, cfg, self.options.progress)
        unseen, how = self._unseen(base, tokenizer, cfg, "untrained", spec.unseen, "")
        return {
            "tasks": metrics,
            "unseen": unseen,
            "unseen_how": how,
            "steps": 0,
            "final_loss": None,
            "trainable_parameters": 0,
        }

    def _single_task(self, spec: RunSpec) -> dict[str, Any]:
        entries = spec.config["tasks"]
        steps = int(spec.config["train"]["steps"])
        per_task = math.ceil(steps / len(entries)) if self.options.single_task_steps == "split" else steps
        names = _entry_names(entries)
        tasks: dict[str, Any] = {}
        unseen: dict[str, Any] = {}
        how = ""
        params, peaks, subruns = 0, [], {}
        for i, (entry, name) in enumerate(zip(entries, names)):
            sub_dir = spec.run_dir / "tasks" / name
            marker = sub_dir / "subrun.json"
            config = copy.deepcopy(spec.config)
            config["tasks"] = [copy.deepcopy(entry)]
            config["train"]["steps"] = per_task
            config["output_dir"] = str(sub_dir / "run")
            config["name"] = f"{spec.config['name']}/{name}"
            config = run_config_from_dict(config).to_dict()
            if marker.is_file():
                sub = json.loads(marker.read_text())
            else:
                peak = PeakMemory()
                peak.reset()
                start = time.perf_counter()
                sub = self._train(config, "single_task_lora", spec.unseen if i == 0 else [])
                sub["wall_time_s"] = round(time.perf_counter() - start, 2)
                sub["peak_memory"] = peak.read()
                sub["config"] = config
                _write_json(marker, sub)
            tasks.update(sub["tasks"])
            if i == 0:
                unseen, how = sub.get("unseen", {}), sub.get("unseen_how", "")
            params += int(sub["trainable_parameters"])
            peaks.append(sub["peak_memory"])
            subruns[name] = {
                "steps": sub["steps"],
                "final_loss": sub["final_loss"],
                "trainable_parameters": sub["trainable_parameters"],
                "wall_time_s": sub["wall_time_s"],
                "run_dir": sub["run_dir"],
            }
        peak_mem = {
            "cpu_max_rss_mb": max(p["cpu_max_rss_mb"] for p in peaks),
            "cpu_max_rss_scope": peaks[0]["cpu_max_rss_scope"],
            "gpu_max_allocated_mb": max((p["gpu_max_allocated_mb"] or 0) for p in peaks) or None,
        }
        return {
            "tasks": tasks,
            "unseen": unseen,
            "unseen_how": how,
            "steps": per_task * len(entries),
            "steps_per_task": per_task,
            "final_loss": None,
            "trainable_parameters": params,
            "trainable_parameters_per_adapter": params // max(1, len(entries)),
            "subruns": subruns,
            "subrun_peak_memory": peak_mem,
        }


def run_bench(
    suite: Suite,
    options: BenchOptions,
    out_dir: str | os.PathLike,
    *,
    report: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) a benchmark and write its report; returns ``{"results", "report"}``.

    Finished runs (their ``result.json`` exists) are skipped; failed runs are recorded in ``error.json`` and
    retried by the next invocation.
    """
    runner = BenchRunner(suite, options, out_dir, log=log)
    results = runner.run()
    paths: dict[str, Any] = {}
    if report:
        from .report import write_report

        paths = write_report(runner.out_dir)
    return {"results": results, "report": paths, "out_dir": runner.out_dir}
