"""Benchmark suites from a YAML file: ``mtpeft bench my_suite.yaml`` on the user's own tasks.

A suite file holds task specs exactly as in a run config, plus what the benchmark trains with::

    name: my-tasks                 # results folder name (default: the file's stem)
    description: ...               # one line for the report
    model: smollm2                 # a name or path, or a run config's model section
    tasks: [...]                   # task entries, as in a run config (specs or preset names)
    unseen: [...]                  # task entries evaluated only
    steps: 200                     # optimizer steps per run
    batch_size: 8
    lr: 1.0e-3
    seeds: 3                       # a count (0, 1, ...) or a list of seeds
    methods: [lora, align_lora, single_task_lora]   # default: every method and the baselines
    budget: 2.4M                   # trainable-parameter budget (each method's rank is chosen for it); null: rank 8
    top_layers: 4                  # adapt only the top k layers (0 or absent: every layer)
    data: {...}                    # run-config sections, passed on as they are
    train: {...}
    eval: {...}
    quick: {steps: 20, seeds: 1}   # what --quick changes (any of the keys above but tasks/unseen)

Relative ``source``/``eval_source`` paths resolve against the suite file's folder when the file is there. Every
method gets the same steps, batch, learning rate, seeds and budget, and its own bench defaults
(:mod:`mtpeft.bench.defaults`). Errors are one line and name the file and the key.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MtpeftError, SuiteError
from .options import validate_methods
from .suites import QUICK_TOP_LAYERS, SUITES, Suite, custom_suite

#: The keys a suite file may hold (``quick`` may hold the same keys but tasks, unseen and quick).
SUITE_FILE_KEYS: tuple[str, ...] = (
    "name", "description", "model", "tasks", "unseen", "steps", "batch_size", "lr", "seeds", "methods", "budget",
    "top_layers", "data", "train", "eval", "quick",
)
#: What ``--quick`` changes when the file has no ``quick`` section for it.
QUICK_DEFAULTS: dict[str, Any] = {"seeds": 1, "top_layers": QUICK_TOP_LAYERS}
QUICK_MAX_STEPS = 30
QUICK_MAX_EVAL = 30


@dataclass
class SuiteFile:
    """A suite file, read: the suite and what the benchmark runs with (None: the command line's default)."""

    suite: Suite
    seeds: list[int] | None
    methods: list[str] | None
    param_budget: int | None
    path: Path


def is_suite_file(text: str) -> bool:
    """Whether a ``mtpeft bench`` SUITE argument names a suite file (``.yaml``/``.yml``) rather than a suite."""
    return text not in SUITES and (text.endswith((".yaml", ".yml")) or Path(text).is_file())


def _fail(path: Path, key: str, message: str) -> SuiteError:
    return SuiteError(f"{path}: {key}: {message}")


def _positive_int(path: Path, key: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(path, key, f"expected an integer >= {minimum}, got {value!r}")
    return value


def _mapping(path: Path, key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, key, f"expected a mapping (a run config's {key} section), got {value!r}")
    return copy.deepcopy(value)


def _seeds(path: Path, key: str, value: Any) -> list[int]:
    if isinstance(value, list):
        if not value or not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
            raise _fail(path, key, f"expected a count or a non-empty list of integer seeds, got {value!r}")
        return list(value)
    return list(range(_positive_int(path, key, value)))


def parse_budget(path: Path, key: str, value: Any) -> int | None:
    """``2400000``, ``'2.4M'``, ``'500k'`` or null -> a positive parameter count or None."""
    import re

    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        count = int(round(value))
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMgG]?)\s*", str(value))
        if not m:
            raise _fail(path, key, f"expected a parameter count such as 2400000, 2.4M or 500k, got {value!r}")
        count = int(round(float(m.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()]))
    if count <= 0:
        raise _fail(path, key, f"the parameter budget must be positive, got {value!r}")
    return count


def _absolute_sources(entries: list[Any], folder: Path) -> list[Any]:
    """Task specs whose relative ``source``/``eval_source`` exist beside the suite file get that path."""
    out = []
    for entry in entries:
        if isinstance(entry, dict):
            entry = dict(entry)
            for key in ("source", "eval_source"):
                value = entry.get(key)
                if isinstance(value, str) and not Path(value).expanduser().is_absolute():
                    candidate = folder / value
                    if candidate.exists():
                        entry[key] = str(candidate.resolve())
        out.append(entry)
    return out


def _check_keys(path: Path, raw: dict[str, Any], allowed: tuple[str, ...], where: str = "") -> None:
    for key in raw:
        if key not in allowed:
            raise _fail(path, f"{where}{key}", f"unknown key; allowed: {', '.join(allowed)}")


def load_suite_file(path: str | Path, *, quick: bool = False) -> SuiteFile:
    """Read and validate a suite file (see the module docstring); ``quick`` applies its ``quick`` section.

    Raises:
        SuiteError: a missing file, bad YAML, an unknown key or a bad value; the message names the file and key.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"suite file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SuiteError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise SuiteError(f"{path}: expected a mapping of suite keys ({', '.join(SUITE_FILE_KEYS)})")
    _check_keys(path, raw, SUITE_FILE_KEYS)
    raw = copy.deepcopy(raw)
    quick_section = raw.pop("quick", None)
    if quick_section is not None:
        quick_keys = tuple(k for k in SUITE_FILE_KEYS if k not in ("tasks", "unseen", "quick"))
        quick_section = _mapping(path, "quick", quick_section)
        _check_keys(path, quick_section, quick_keys, "quick.")
    if quick:
        raw = {**raw, **{k: v for k, v in QUICK_DEFAULTS.items() if k not in (quick_section or {})}}
        raw.update(quick_section or {})
    return _build(path, raw, quick, quick_section is None)


def _build(path: Path, raw: dict[str, Any], quick: bool, quick_caps: bool) -> SuiteFile:
    tasks = raw.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise _fail(path, "tasks", "expected a non-empty list of task entries (task specs as in a run config)")
    unseen = raw.get("unseen") or []
    if not isinstance(unseen, list):
        raise _fail(path, "unseen", f"expected a list of task entries, got {unseen!r}")
    model = raw.get("model", "smollm2")
    model = {"name": model} if isinstance(model, str) else _mapping(path, "model", model)
    config: dict[str, Any] = {
        "model": {"dtype": "float32", **model},
        "data": {"truncation": "left", **_mapping(path, "data", raw.get("data", {}))},
        "train": {"log_every": 10, "keep_checkpoints": 1, **_mapping(path, "train", raw.get("train", {}))},
        "eval": {"before_training": False, **_mapping(path, "eval", raw.get("eval", {}))},
    }
    train = config["train"]
    train["eval_every"] = 0  # the bench evaluates once, at the end
    if "steps" in raw:
        train["steps"] = _positive_int(path, "steps", raw["steps"])
    if "batch_size" in raw:
        train["batch_size"] = _positive_int(path, "batch_size", raw["batch_size"])
    if "lr" in raw:
        lr = raw["lr"]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
            raise _fail(path, "lr", f"expected a positive learning rate such as 1.0e-3, got {lr!r}")
        train["lr"] = float(lr)
    train.setdefault("steps", 100)
    if quick and quick_caps:
        train["steps"] = min(train["steps"], QUICK_MAX_STEPS)
        config["data"].setdefault("max_eval_per_task", QUICK_MAX_EVAL)
    top = raw.get("top_layers")
    top = None if top is None else (_positive_int(path, "top_layers", top, 0) or None)
    seeds = _seeds(path, "seeds", raw["seeds"]) if "seeds" in raw else None
    methods = None
    if "methods" in raw:
        try:
            methods = validate_methods(raw["methods"])
        except MtpeftError as exc:
            raise _fail(path, "methods", str(exc)) from None
    for key in ("name", "description"):
        if key in raw and not isinstance(raw[key], str):
            raise _fail(path, key, f"expected a string, got {raw[key]!r}")
    name = raw.get("name") or path.stem
    folder = path.resolve().parent
    tasks, unseen = _absolute_sources(tasks, folder), _absolute_sources(unseen, folder)
    _check_tasks(path, tasks, unseen, config)
    try:
        suite = custom_suite(tasks, config, name=name, unseen=unseen, description=raw.get("description", ""),
                             top_layers=top)
    except MtpeftError as exc:
        raise _fail(path, "tasks", str(exc)) from None
    suite.quick = quick
    return SuiteFile(suite, seeds, methods, parse_budget(path, "budget", raw.get("budget")), path)


def _check_tasks(path: Path, tasks: list[Any], unseen: list[Any], config: dict[str, Any]) -> None:
    """The task entries and sections as a run config would check them (before any model is loaded)."""
    from ..data.resolve import resolve_task_specs
    from ..data.sources import resolve_source
    from ..training.run_config import run_config_from_dict

    for key, entries in (("tasks", tasks), ("unseen", unseen)):
        for i, entry in enumerate(entries):
            if not isinstance(entry, (str, dict)):
                raise _fail(path, f"{key}[{i}]", f"expected a preset name or a task-spec mapping, got {entry!r}")
    try:
        cfg = run_config_from_dict({**copy.deepcopy(config), "tasks": [*tasks, *unseen], "method": {"method": "lora"},
                                    "output_dir": str(path.parent / "unused")})
        for spec in resolve_task_specs(dataclasses.replace(cfg, tasks=[*tasks, *unseen])):
            for source in (spec.source, spec.eval_source):
                if source is not None:
                    resolve_source(source, cfg.data.root)
    except (MtpeftError, ValueError, TypeError, KeyError, FileNotFoundError) as exc:
        raise SuiteError(f"{path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
