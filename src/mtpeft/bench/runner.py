"""The benchmark runner: every method (and three baselines) on the same data, steps and evaluation.

A *run* is one (setting, method, seed), planned by :mod:`mtpeft.bench.plan`; a method's run is trained with
:class:`~mtpeft.training.trainer.MultiTaskTrainer` (:mod:`mtpeft.bench.method_run`), the baselines run as
:mod:`mtpeft.bench.baselines` says. Unseen tasks (the ``commonsense`` suite) are evaluated afterwards under the
unseen-task policy. Results go to the folder layout of :mod:`mtpeft.bench.layout`.

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
  run) or ``steps`` each (``'same'``); each task is evaluated with its own adapter. ``peft_lora``: Hugging Face
  PEFT's LoRA on the ``lora`` run's config, trained by a plain PyTorch loop on the same batches and evaluated
  the same way (:mod:`mtpeft.bench.peft_baseline`): the check that mtpeft's LoRA matches PEFT's.
* **Unseen tasks** (:data:`~mtpeft.bench.options.UNSEEN_POLICIES`): ``auto`` evaluates methods that need no
  task id at inference without one (MoE-LoRA's task gate then uses its learned "unknown task" row), methods
  that need one (MTL-LoRA, TA-LoRA) and single-task LoRA with task id 0 / the first task's adapter;
  ``first_task`` gives every method task id 0; ``skip`` evaluates unseen tasks only for methods that need no
  task id.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import os
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..errors import BenchError
from ..training.run_config import flat_keys, run_config_from_dict
from .baselines import run_single_task, run_untrained
from .layout import BENCH_NAME, ERROR_NAME, RESULT_NAME, write_json
from .memory import PeakMemory, cpu_seconds
from .method_run import train_method
from .options import BenchOptions
from .peft_baseline import run_peft_lora
from .plan import RunSpec, plan_runs
from .provenance import device_info, git_state, package_versions
from .report import write_report
from .scoring import macro_score, micro_score
from .suites import Suite


def _now() -> str:
    """The current UTC time, to the second (ISO 8601), for the records."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two run-config mappings.

    ``output_dir`` is ignored, and so is a key of the model/data/train/eval sections that only one side has
    (those sections always hold every field, so such a key comes from a newer or older mtpeft, not from the
    benchmark's options).
    """
    a = {k: v for k, v in flat_keys(old).items() if k != "output_dir"}
    b = {k: v for k, v in flat_keys(new).items() if k != "output_dir"}

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
            "updated": _now(),
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
        from ..data.resolve import resolve_task_specs
        from ..data.sources import resolve_source

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
        write_json(self.out_dir / BENCH_NAME, self.bench_record())
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
                write_json(
                    spec.run_dir / ERROR_NAME,
                    {
                        "setting": spec.setting,
                        "method": spec.method,
                        "seed": spec.seed,
                        "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc(),
                        "config": spec.config,
                        "time": _now(),
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
            write_json(spec.run_dir / RESULT_NAME, result)
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
            "started": _now(),
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
        cpu_start = cpu_seconds()
        if spec.method == "untrained":
            out = run_untrained(spec, self.options)
        elif spec.method == "single_task_lora":
            out = run_single_task(spec, self.options)
        elif spec.method == "peft_lora":
            out = run_peft_lora(spec, self.options)
        else:
            out = train_method(spec.config, spec.method, spec.unseen, self.options)
        record.update(out)
        record["wall_time_s"] = round(time.perf_counter() - start, 2)
        record["cpu_time_s"] = round(cpu_seconds() - cpu_start, 2)
        if spec.method == "single_task_lora" and out.get("subrun_peak_memory"):
            record["peak_memory"] = out.pop("subrun_peak_memory")
        else:
            record["peak_memory"] = peak.read()
        record["macro"] = macro_score(record["tasks"])
        record["micro"] = micro_score(record["tasks"])
        record["unseen_macro"] = macro_score(record.get("unseen") or {}) if record.get("unseen") else None
        record["finished"] = _now()
        return record


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
    paths = write_report(runner.out_dir) if report else {}
    return {"results": results, "report": paths, "out_dir": runner.out_dir}
