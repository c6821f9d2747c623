"""Experiment tracking (``train.report_to``) through accelerate's trackers: TensorBoard, Weights & Biases, MLflow
and the others accelerate knows.

The accelerator is built with ``log_with`` and a logging folder inside the run folder (:func:`accelerator_kwargs`);
:class:`RunTracker` then starts the trackers with the run config as hyperparameters, logs every metrics record
(loss, aux losses, lr, tokens/s, method counters; evaluations as ``eval/...``) at its optimizer step, the final
per-task scores, and ends them. Off (every call a no-op) when ``report_to`` is empty, the default.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any

from ..errors import TrainingError

#: The tracker names accelerate accepts (``LoggerType``), and 'all' (every installed one).
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio", "all")

#: The folder, inside the run folder, that local trackers (TensorBoard, MLflow without a tracking URI) write to.
TRACKING_DIR = "tracking"


def accelerator_kwargs(cfg: Any) -> dict[str, Any]:
    """``Accelerator(...)`` keyword arguments for the run config's trackers: none when ``report_to`` is empty. A
    tracker whose package is not installed is an error here, before anything is written (accelerate would drop
    it silently)."""
    wanted = list(cfg.train.report_to or [])
    if not wanted:
        return {}
    from accelerate.tracking import get_available_trackers

    available = sorted(str(t) for t in get_available_trackers())
    missing = [name for name in wanted if name != "all" and name not in available]
    if missing:
        raise TrainingError(f"train.report_to: {missing} not installed (pip install {' '.join(missing)}); "
                            f"installed trackers: {available or 'none'}")
    return {"log_with": wanted, "project_dir": str(Path(cfg.output_dir) / TRACKING_DIR)}


def hyperparameters(cfg: Any) -> dict[str, Any]:
    """The run config as flat ``section.key`` values that every tracker stores (numbers, strings and booleans;
    anything else as its text)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:
            flat[prefix] = str(value)

    walk("", cfg.to_dict())
    return flat


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics record, named for the trackers: evaluation scores (``eval_macro``) as
    ``eval/macro``, the rest under ``train/`` (``train/loss``, ``train/aux/<name>``, ``train/counters/<name>``)."""
    out: dict[str, float] = {}

    def add(name: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                add(f"{name}/{key}", item)
        elif isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)

    for key, value in record.items():
        if key == "step":
            continue
        add(f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}", value)
    return out


class RunTracker:
    """The trackers of one run, on the accelerator built with :func:`accelerator_kwargs` (accelerate logs on the
    main process only)."""

    def __init__(self, accelerator: Any, cfg: Any) -> None:
        self.accelerator = accelerator
        self.active = bool(cfg.train.report_to)
        if self.active:
            accelerator.init_trackers(cfg.name, config=hyperparameters(cfg))

    def log(self, record: dict[str, Any]) -> None:
        """Log one metrics record at its step."""
        values = scalars(record)
        if self.active and values:
            self.accelerator.log(values, step=int(record.get("step", 0)))

    def finish(self, step: int, result: Any) -> None:
        """Log the final evaluation (macro, micro and every task's metrics as ``eval/<task>/<metric>``) and end
        the trackers."""
        if not self.active:
            return
        if result is not None:
            record: dict[str, Any] = {"step": step, "eval_macro": result.macro, "eval_micro": result.micro}
            record.update({f"eval_{task}": metrics for task, metrics in result.metrics.items()})
            self.log(record)
        self.accelerator.end_training()
        self.active = False
