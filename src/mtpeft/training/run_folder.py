"""Opening a run folder for training: whose it is, the lock, and whether ``--resume`` may continue it.

Everything here is checked before anything is written: a refused start leaves the folder exactly as it was.

- A new run goes into a missing or empty folder, or a run folder without checkpoints. A folder of other files is
  refused unless ``overwrite`` (see :mod:`mtpeft.io.output_dir`); a run folder with checkpoints needs ``resume``
  (continue it) or ``overwrite`` (start again: mtpeft's own outputs are removed, every other file is kept).
- ``resume`` refuses a config that changes what the saved run trained (:func:`resume_changes` names the keys).
  The keys of :data:`RESUMABLE_KEYS` may change; such a change is applied and recorded in ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import OutputFolderError, ResumeError, TrainingError
from ..io.output_dir import (
    RUN_MARKER,
    acquire_run_lock,
    check_output_folder,
    clean_orphan_writes,
    is_run_folder,
    release_run_lock,
)
from .checkpoint import checkpoint_dirs, json_default, rewind_metrics_log
from .run_config import RunConfig, flat_keys

__all__ = ["RESUMABLE_KEYS", "RUN_OUTPUTS", "RunFolder", "open_run_folder", "release_run_lock", "resume_changes"]

#: Keys a resumed run may change (where it writes, how often it logs and saves, how far it trains, where it runs,
#: how it evaluates); any other change is refused by ``--resume``.
RESUMABLE_KEYS = ("output_dir", "name", "train.steps", "train.log_every", "train.eval_every", "train.save_every",
                  "train.keep_checkpoints", "train.device", "train.compile", "train.report_to", "data.root",
                  "data.max_eval_per_task", "eval.")
#: What ``mtpeft train`` writes into a run folder (``--overwrite`` removes these and nothing else).
RUN_OUTPUTS = ("checkpoints", "adapter", "eval", "analysis", "plots", "tracking", "metrics.jsonl", "summary.json")


def resume_changes(saved: dict[str, Any], new: dict[str, Any]) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """``(allowed, refused)``: the keys whose values differ between the saved run config and the new one, each
    ``key -> [old, new]``. A section key only one side has (an older or newer mtpeft) is not a change."""
    a, b = flat_keys(saved), flat_keys(new)
    allowed, refused = {}, {}
    for key in sorted(set(a) | set(b)):
        if (key not in a or key not in b) and key.split(".", 1)[0] in ("model", "data", "train", "eval"):
            continue
        if json.dumps(a.get(key), default=str, sort_keys=True) == json.dumps(b.get(key), default=str, sort_keys=True):
            continue
        free = any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS)
        (allowed if free else refused)[key] = [a.get(key), b.get(key)]
    return allowed, refused


@dataclass
class RunFolder:
    """A run folder opened for training: its complete checkpoints (to resume from) and the resume changes."""

    path: Path
    checkpoints: list[Path]
    changes: dict[str, list[Any]] = field(default_factory=dict)

    def start_log(self, log_path: Path, step: int | None) -> None:
        """Rewind the metrics log to ``step`` (None: a fresh run), then record the applied resume changes."""
        rewind_metrics_log(log_path, step)
        if self.changes:
            with open(log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step or 0, "resumed_with_changes": self.changes},
                                    default=json_default) + "\n")


def open_run_folder(cfg: RunConfig, *, resume: bool, overwrite: bool = False, main: bool = True) -> RunFolder:
    """Check the run folder, and on the main process lock it, then write its marker and ``run_config.yaml``.

    Raises:
        OutputFolderError: a file, a folder of other files (without ``overwrite``), or not writable.
        RunLockedError: another live run trains into it.
        TrainingError: it holds checkpoints and neither ``resume`` nor ``overwrite`` is given.
        ResumeError: ``resume`` with changed keys that are not in :data:`RESUMABLE_KEYS`.
    """
    path = Path(cfg.output_dir)
    check_output_folder(path, overwrite=overwrite)
    ours = is_run_folder(path)
    if main:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputFolderError(f"cannot create output_dir {path}: {exc.strerror or exc}") from exc
        acquire_run_lock(path)
    try:
        folder = _checked(cfg, path, resume, overwrite)
        if main:
            _prepare(cfg, path, restart=overwrite and ours and not folder.checkpoints)
        return folder
    except BaseException:
        if main:
            release_run_lock(path)
        raise


def _checked(cfg: RunConfig, path: Path, resume: bool, overwrite: bool) -> RunFolder:
    checkpoints = checkpoint_dirs(path)
    if checkpoints and not resume:
        if overwrite:
            return RunFolder(path, [])
        raise TrainingError(f"{path} already has checkpoints: pass --resume to continue that run, --overwrite to "
                            f"train it again from the start, or choose another output_dir")
    if not checkpoints or not (path / "run_config.yaml").is_file():
        return RunFolder(path, checkpoints)
    saved = yaml.safe_load((path / "run_config.yaml").read_text()) or {}
    allowed, refused = resume_changes(saved, cfg.to_dict())
    if refused:
        shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ResumeError(f"cannot resume {path}: the config changes what the saved run trained ({shown}); put "
                          f"these keys back, or train into another output_dir (keys a resume may change: "
                          f"{', '.join(RESUMABLE_KEYS)})")
    return RunFolder(path, checkpoints, allowed)


def _prepare(cfg: RunConfig, path: Path, *, restart: bool) -> None:
    """Remove a killed run's unfinished writes (and on ``restart``, an overwritten run folder: the old run's
    outputs, never other files), then mark the folder and save the run config."""
    try:
        clean_orphan_writes(path)
        if restart:
            for name in RUN_OUTPUTS:
                target = path / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
        (path / RUN_MARKER).write_text(json.dumps({"kind": "run"}) + "\n")
        draft = path / ".run_config.yaml.tmp"  # replaced whole: another process may be reading it
        cfg.save(draft)
        os.replace(draft, path / "run_config.yaml")
    except OSError as exc:
        raise OutputFolderError(f"cannot write into output_dir {path}: {exc.strerror or exc}") from exc
