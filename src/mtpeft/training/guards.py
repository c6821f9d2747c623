"""What keeps a run's saved state sound: non-finite losses and gradients never reach the weights (the run stops, or
skips the batch), and a Ctrl-C is held off between an optimizer update and the step count."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import TrainingError
from .checkpoint import last_checkpoint_text

__all__ = ["MAX_CONSECUTIVE_SKIPS", "NonFiniteGuard", "sigint_deferred"]

# nan_policy=skip: this many skipped batches in a row stop the run (the weights themselves are broken).
MAX_CONSECUTIVE_SKIPS = 20


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) until the block ends, then raise KeyboardInterrupt (main thread only)."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    pending: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pending:
        raise KeyboardInterrupt


class NonFiniteGuard:
    """``train.nan_policy`` for a batch whose loss or gradient norm is NaN or inf: ``error`` stops the run naming
    the step, the tasks of the batch and the last good checkpoint; ``skip`` drops the batch (logged) and stops
    after MAX_CONSECUTIVE_SKIPS in a row."""

    def __init__(self, policy: str, output_dir: Path, log: Callable[[dict[str, Any]], None]) -> None:
        self.policy = policy
        self.output_dir = output_dir
        self.log = log
        self.skipped = 0
        self.consecutive = 0

    def passed(self) -> None:
        """A step's loss and gradients were finite."""
        self.consecutive = 0

    def failed(self, step: int, micro: int | None, tasks: list[str], value: float) -> None:
        """Optimizer step ``step + 1`` had a non-finite loss (in micro-batch ``micro``) or, with ``micro`` None,
        gradient norm ``value``; raises TrainingError unless the batch is skipped."""
        what = "loss" if micro is not None else "gradient norm"
        last_text = last_checkpoint_text(self.output_dir)
        if self.policy == "skip":
            self.skipped += 1
            self.consecutive += 1
            self.log({"step": step + 1, "skipped": True, "reason": f"non-finite {what}", "tasks": tasks})
            if self.consecutive >= MAX_CONSECUTIVE_SKIPS:
                raise TrainingError(
                    f"{self.consecutive} batches in a row had a non-finite loss or gradient (the last: non-finite "
                    f"{what} at step {step + 1}): the weights or the learning rate are broken; the last good "
                    f"checkpoint is {last_text}. Lower train.lr")
            return
        where = f" (micro-batch {micro})" if micro is not None else ""
        raise TrainingError(
            f"non-finite {what} ({value}) at step {step + 1}{where}; tasks in the batch: {tasks}. Nothing was "
            f"saved from this step; the last good checkpoint is {last_text}. Set train.nan_policy=skip to drop "
            f"such batches, or lower train.lr")

    @staticmethod
    def check_applied(norm: Any, step: int, tasks: list[str]) -> None:
        """DeepSpeed clips inside its own step, so a non-finite gradient norm is known only once the update is
        applied: the run stops there, before anything is saved."""
        if norm is not None and not math.isfinite(float(norm)):
            raise TrainingError(
                f"non-finite gradient norm ({float(norm)}) at step {step + 1} under DeepSpeed, which has already "
                f"applied the update; tasks in the batch: {tasks}. Nothing was saved from this step; resume from "
                f"the last good checkpoint with a lower train.lr")
