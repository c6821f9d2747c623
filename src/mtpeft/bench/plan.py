"""The plan of a benchmark: one validated run config per (setting, method, seed).

A run's config is the suite's shared sections plus the setting's tasks and steps plus the method's config from
:data:`~mtpeft.bench.defaults.METHOD_DEFAULTS` (top layers, ``--set`` overrides, the budget's rank and
``alpha = 2 r`` applied in that order).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BenchError
from ..registry import get_method
from ..training.run_config import RunConfigError, apply_overrides, parse_override, run_config_from_dict
from .budget import choose_rank, model_config, num_layers
from .defaults import method_defaults, resolve_auto
from .layout import RESULT_NAME, run_folder
from .options import BenchOptions, split_overrides
from .suites import Suite, SuiteSetting, apply_scaling_steps


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


def _adapt_top_layers(cfg: dict[str, Any], top: int, config: Any) -> None:
    """Adapt only the top ``top`` layers: ``layers_to_transform`` (every method, TA-LoRA included)."""
    n_layers = num_layers(config)
    cfg["layers_to_transform"] = list(range(max(0, n_layers - top), n_layers))


def build_method_config(
    method: str, suite: Suite, setting: SuiteSetting, options: BenchOptions, notes: list[str] | None = None
) -> tuple[dict[str, Any], int | None]:
    """The method section of a run (defaults, top layers, overrides, budget rank, alpha) and the planned
    trainable parameters (None without a budget)."""
    notes = notes if notes is not None else []
    general, per_method = split_overrides(options.overrides, options.methods)
    if method == "peft_lora":  # the lora run's method section: lora's own overrides, then peft_lora's
        per_method = {method: [*per_method.get("lora", []), *per_method.get(method, [])]}
    cfg = method_defaults(method)
    model_name = options.model or suite.config.get("model", {}).get("name", "smollm2")
    trust = bool(suite.config.get("model", {}).get("trust_remote_code", False))
    base_config = model_config(model_name, trust)
    top = suite.top_layers if options.top_layers is None else (options.top_layers or None)
    if top:
        _adapt_top_layers(cfg, top, base_config)
    resolve_auto(cfg, base_config)
    wrapper = {"method": cfg}
    apply_overrides(wrapper, [o for o in general if o.startswith("method.")])
    apply_overrides(wrapper, per_method.get(method, []))
    cfg = wrapper["method"]
    explicit = {parse_override(o)[0][-1] for o in [*general, *per_method.get(method, [])] if o.startswith("method.")}
    if cfg.get("preset") is not None:  # a preset's published values win over the bench-wide r, dropout and alpha
        published = get_method(cfg["method"]).config_class.preset_values(cfg["preset"])
        cfg.update({key: value for key, value in published.items() if key not in explicit})
        explicit |= {"alpha"} & set(published)  # --param-budget may still choose r
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
                run_dir = run_folder(out, setting.name, method, seed)
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
