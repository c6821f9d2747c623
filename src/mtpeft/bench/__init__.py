"""The benchmark harness: suites, the plan, the runner (every method plus baselines on the same budget) and the
report.

Modules: ``suites`` (which tasks, which run config), ``options`` (what an invocation asks for), ``defaults``
(each method's bench config), ``budget`` (parameter counting and the rank search), ``plan`` (one run config per
setting, method and seed), ``method_run`` and ``baselines`` (what one run does), ``scoring`` (evaluation and the
unseen-task policy), ``provenance`` and ``memory`` (what a result records about itself), ``layout`` (the bench
folder), ``runner`` (orchestration), ``report`` and ``plots``; ``suite_file`` (a suite from a YAML file of the
user's tasks), ``paired`` and ``ranking`` (paired confidence intervals against LoRA and single-task LoRA, and the
recommendation).

Python API::

    from mtpeft.bench import BenchOptions, get_suite, run_bench
    suite = get_suite("bbh27", quick=True)
    options = BenchOptions(methods=["lora", "thanora", "untrained"], seeds=[0])
    run_bench(suite, options, "benchmarks/results/bbh27-quick-mine")

Command line: ``mtpeft bench SUITE ...`` (see ``benchmarks/README.md``). The names below are imported lazily,
so that building the ``mtpeft`` argument parser stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    **{name: "report" for name in ("aggregate", "write_report")},
    "load_results": "layout",
    **{name: "suite_file" for name in ("SuiteFile", "load_suite_file")},
    **{name: "paired" for name in ("PairedDifference", "compare", "recommendation")},
    **{
        name: "options"
        for name in (
            "BASELINES",
            "DEFAULT_METHODS",
            "SINGLE_TASK_STEPS",
            "UNSEEN_POLICIES",
            "BenchError",
            "BenchOptions",
            "validate_methods",
        )
    },
    "METHOD_DEFAULTS": "defaults",
    **{name: "budget" for name in ("choose_rank", "count_trainable_parameters")},
    **{name: "plan" for name in ("RunSpec", "plan_runs")},
    **{name: "runner" for name in ("BenchRunner", "run_bench")},
    **{
        name: "suites"
        for name in (
            "SUITES",
            "Suite",
            "SuiteError",
            "SuiteSetting",
            "available_suites",
            "custom_suite",
            "get_suite",
        )
    },
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
