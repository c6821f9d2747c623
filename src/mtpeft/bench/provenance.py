"""Where a result came from: package versions, the git state of the mtpeft checkout, the device."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch


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
