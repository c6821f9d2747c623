"""Checkpoints of a run, without pickle: the adapter, the optimizer and RNG states as safetensors, the rest as JSON.

``OUT/checkpoints/step-NNNNNNN/`` holds ``adapter/``, ``optimizer.safetensors``, ``rng.safetensors`` and
``trainer_state.json`` (step, data position, scheduler, optimizer hyperparameters, RNG scalars, task list). A
checkpoint is written into a hidden temporary folder and renamed into place, so a listed checkpoint is always
whole; the newest ``keep`` are kept.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import TrainingError
from ..io.atomic import atomic_write_dir

if TYPE_CHECKING:
    from ..model import MTModel

__all__ = ["CHECKPOINTS", "RandomState", "SavedCheckpoint", "checkpoint_dirs", "checkpoint_path", "json_default",
           "last_checkpoint_text", "load_checkpoint", "random_state", "restore_random_state", "rewind_metrics_log",
           "save_checkpoint"]

CHECKPOINTS = "checkpoints"

#: The state of every random generator a run draws from: tensors (torch, CUDA) and JSON-ready values (Python, numpy).
RandomState = tuple[dict[str, torch.Tensor], dict[str, Any]]


# --- optimizer / RNG state without pickle -------------------------------------------------------------
def _optimizer_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def random_state() -> RandomState:
    """The current state of torch's (and CUDA's), Python's and numpy's generators."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    np_state = np.random.get_state()
    meta = {"python": _jsonable(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, meta


def restore_random_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Set every generator back to a :func:`random_state` (CUDA's only where the device count matches)."""
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    random.setstate(_tupled(meta["python"]))
    np_state = meta["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` for tensors and numpy values in trainer state and metric records."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _logged_step(line: str) -> float:
    """The step of a metrics-log line; a torn or empty line (a kill mid-write) counts as never logged."""
    try:
        return float(json.loads(line).get("step", math.inf))
    except (json.JSONDecodeError, AttributeError):
        return math.inf


def rewind_metrics_log(path: Path, step: int | None) -> None:
    """Make a run's metrics log agree with where it starts: a fresh run (``step`` None) starts without one; a
    resumed run drops the lines a killed run logged after its last checkpoint (``step``), torn ones included."""
    if not path.exists():
        return
    if step is None:
        path.unlink()
        return
    kept = [ln for ln in path.read_text().splitlines() if _logged_step(ln) <= step]
    path.write_text("".join(ln + "\n" for ln in kept))


# --- checkpoints --------------------------------------------------------------------------------------
def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (partial writes are hidden dot-folders and never listed)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
             and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of ``step`` lives."""
    return Path(output_dir) / CHECKPOINTS / f"step-{step:07d}"


def last_checkpoint_text(output_dir: str | os.PathLike, none: str = "none (no checkpoint yet)") -> str:
    """The newest complete checkpoint's path, for error messages that say what is intact."""
    found = checkpoint_dirs(output_dir)
    return str(found[-1]) if found else none


def save_checkpoint(output_dir: str | os.PathLike, step: int, model: MTModel, optimizer_state: dict[str, Any],
                    scheduler: Any, sampler_state: dict[str, Any], rng: RandomState,
                    extra: dict[str, Any], keep: int = 2,
                    adapter_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint ``step-N`` atomically (adapter, optimizer, scheduler, RNG, data position).

    ``optimizer_state`` is an ``Optimizer.state_dict()`` with whole tensors and ``adapter_state`` the whole
    adapter tensors (default: the model's own); :mod:`mtpeft.training.engines` gathers both from sharded runs.
    """
    target = checkpoint_path(output_dir, step)
    opt_tensors, opt_meta = _optimizer_to_files(optimizer_state)
    rng_tensors, rng_meta = rng

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp / "adapter", state_dict=adapter_state)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        state = {"step": step, "sampler": sampler_state, "scheduler": scheduler.state_dict(),
                 "optimizer": opt_meta, "rng": rng_meta, "counters": dict(model.context.counters), **extra}
        (tmp / "trainer_state.json").write_text(json.dumps(state, default=json_default))

    try:
        atomic_write_dir(target, write)
    except (OSError, ValueError) as exc:  # disk full, permissions; a non-finite adapter is refused
        raise TrainingError(f"could not write checkpoint {target}: {exc}. The last good checkpoint "
                            f"({last_checkpoint_text(output_dir, 'none')}) is intact; free space or fix permissions "
                            f"and resume with --resume") from exc
    for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


@dataclass
class SavedCheckpoint:
    """What a checkpoint holds, read back (see :func:`load_checkpoint`)."""

    step: int
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # an Optimizer.state_dict(), loaded after accelerate.prepare
    scheduler: dict[str, Any]
    sampler: dict[str, Any]
    rng: RandomState  # restored last, with restore_random_state
    counters: dict[str, int] = field(default_factory=dict)  # the method's run counters (mtLoRA's firings)


def load_checkpoint(path: Path, task_names: list[str]) -> SavedCheckpoint:
    """Read checkpoint ``path`` of a run with these tasks.

    Raises:
        TrainingError: the checkpoint was made for other tasks.
    """
    state = json.loads((path / "trainer_state.json").read_text())
    if state.get("tasks") != task_names:
        raise TrainingError(f"checkpoint {path} was made for tasks {state.get('tasks')}, this run has {task_names}")
    return SavedCheckpoint(
        step=int(state["step"]),
        adapter=load_file(str(path / "adapter" / "adapter_model.safetensors")),
        optimizer=_optimizer_from_files(load_file(str(path / "optimizer.safetensors")), state["optimizer"]),
        scheduler=state["scheduler"], sampler=state["sampler"],
        rng=(load_file(str(path / "rng.safetensors")), state["rng"]),
        counters={str(k): int(v) for k, v in state.get("counters", {}).items()})
