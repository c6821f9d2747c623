"""The bench folder's layout: where each run's result, error and run folder live, and how they are read back.

Folder layout under the bench folder ``OUT``::

    OUT/bench.json                                   the invocation (suite, methods, seeds, options)
    OUT/runs/<setting>/<method>/seed-<k>/result.json  a finished run (present = done; skipped on re-runs)
    OUT/runs/<setting>/<method>/seed-<k>/run/          the Trainer's run folder (run_config.yaml, adapter/...)
    OUT/runs/<setting>/<method>/seed-<k>/error.json    a failed run (retried on the next invocation)
    OUT/report.md, OUT/report.json, OUT/plots/*.png    written by :mod:`mtpeft.bench.report`

This module is a leaf of :mod:`mtpeft.bench`: the runner writes this layout and the report reads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RESULT_NAME = "result.json"
ERROR_NAME = "error.json"
BENCH_NAME = "bench.json"


def run_folder(out_dir: str | os.PathLike, setting: str, method: str, seed: int) -> Path:
    """``OUT/runs/<setting>/<method>/seed-<k>``: the folder of one run."""
    return Path(out_dir) / "runs" / setting / method / f"seed-{seed}"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON through a temporary sibling file, so that a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str, allow_nan=True) + "\n")
    os.replace(tmp, path)


def load_results(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every finished run's result record under ``out_dir/runs`` (sorted by setting, method, seed)."""
    runs = Path(out_dir) / "runs"
    found = [json.loads(p.read_text()) for p in sorted(runs.glob(f"*/*/seed-*/{RESULT_NAME}"))]
    return sorted(found, key=lambda r: (r["setting"], r["method"], r["seed"]))


def load_errors(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The failed runs (``error.json`` without a ``result.json`` beside it)."""
    runs = Path(out_dir) / "runs"
    return [
        json.loads(p.read_text())
        for p in sorted(runs.glob(f"*/*/seed-*/{ERROR_NAME}"))
        if not (p.parent / RESULT_NAME).exists()
    ]
