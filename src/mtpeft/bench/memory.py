"""What a run costs: CPU seconds and peak memory (CPU max RSS, GPU max allocated)."""

from __future__ import annotations

import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class PeakMemory:
    """Peak memory of one run: CPU max RSS (``resource.getrusage``; reset per run through
    ``/proc/self/clear_refs`` where Linux allows it, else the process peak so far) and
    ``torch.cuda.max_memory_allocated``."""

    def __init__(self) -> None:
        self.scope = "process"

    def reset(self) -> None:
        """Start measuring."""
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.scope = "run"
        except OSError:
            self.scope = "process"

    def read(self) -> dict[str, Any]:
        """The peaks since :meth:`reset` (MiB)."""
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss_mb = rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024
        out: dict[str, Any] = {
            "cpu_max_rss_mb": round(rss_mb, 1),
            "cpu_max_rss_scope": self.scope,
            "gpu_max_allocated_mb": None,
        }
        if torch.cuda.is_available():
            out["gpu_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out


def combined_peak(peaks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The peak over several runs' :meth:`PeakMemory.read` records (single-task LoRA's sub-runs)."""
    return {
        "cpu_max_rss_mb": max(p["cpu_max_rss_mb"] for p in peaks),
        "cpu_max_rss_scope": peaks[0]["cpu_max_rss_scope"],
        "gpu_max_allocated_mb": max((p["gpu_max_allocated_mb"] or 0) for p in peaks) or None,
    }
