"""The one way a run's task entries become task specs (train, eval, validate, bench and analysis all use it).

A run config's ``tasks`` list holds preset names (``"bbh27"``, ``"glue:cola"``, ``"demo:arithmetic,reverse"``,
see :mod:`mtpeft.data.presets`) and task-spec mappings (:class:`~mtpeft.data.spec.TaskSpec` fields).
:func:`resolve_task_specs` expands them in order against the run's data root and seed and applies the run's
per-task caps; :func:`~mtpeft.data.tasks.load_tasks` then reads the examples.
"""

from __future__ import annotations

from typing import Any

from .presets import preset
from .spec import TaskSpec

__all__ = ["resolve_task_specs"]


def resolve_task_specs(cfg: Any) -> list[TaskSpec]:
    """Turn a run config's task entries (preset names or mappings) into task specs, in order.

    ``cfg`` is a :class:`~mtpeft.training.run_config.RunConfig` (what is read: ``tasks``, ``data.root``,
    ``data.max_train_per_task``, ``data.max_eval_per_task`` and ``train.seed``, which seeds generated tasks).

    Raises:
        ValueError: an unknown preset, an invalid task mapping (``tasks[i]: ...``) or a task name used twice.
    """
    specs: list[TaskSpec] = []
    for i, entry in enumerate(cfg.tasks):
        if isinstance(entry, str):
            specs.extend(preset(entry, cfg.data.root, seed=cfg.train.seed))
            continue
        try:
            specs.append(TaskSpec.from_dict(entry))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"tasks[{i}]: {exc}") from exc
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate task names in the run config: {dup}")
    for spec in specs:
        if cfg.data.max_train_per_task is not None:
            spec.max_train = min(spec.max_train or cfg.data.max_train_per_task, cfg.data.max_train_per_task)
        if cfg.data.max_eval_per_task is not None:
            spec.max_eval = min(spec.max_eval or cfg.data.max_eval_per_task, cfg.data.max_eval_per_task)
    return specs
