"""The per-forward task context every adapter layer of one model shares.

The per-sample task ids of the current batch reach every layer through one :class:`TaskContext` that the
:class:`~mtpeft.model.MTModel` sets before it calls the base model, so the base model's own forward code
needs no change.
"""

from __future__ import annotations

import torch


class TaskContext:
    """Per-forward state shared by all adapter layers of one model.

    ``task_ids``: LongTensor (batch,) or None. ``token_mask``: the attention mask (batch, seq) or None, for
    losses that must ignore padding. ``collect``: layers cache what the auxiliary losses need (training only).
    ``global_step``: the optimizer step, for regularizers applied every k steps. ``total_steps``: the run's
    length in optimizer steps when a trainer knows it (None otherwise), for schedules relative to the run.
    ``micro_step``: the micro-batch's index within the optimizer step under gradient accumulation (0 when there
    is none), so that a term meant once per optimizer step is added to one micro-batch only. ``counters``: event
    counts methods keep for the run summary (e.g. mtLoRA's ``spectral_firings``).

    The values stay set after a forward returns, so that activation checkpointing can recompute the forward
    during backward with the same task ids; the next forward overwrites them.
    """

    def __init__(self) -> None:
        self.task_ids: torch.Tensor | None = None
        self.token_mask: torch.Tensor | None = None
        self.collect: bool = False
        self.global_step: int = 0
        self.total_steps: int | None = None
        self.micro_step: int = 0
        self.counters: dict[str, int] = {}

    def count(self, name: str, by: int = 1) -> None:
        """Add ``by`` to the run counter ``name`` (reported in the trainer's metrics and ``summary.json``)."""
        self.counters[name] = self.counters.get(name, 0) + by

    def require_task_ids(self, who: str, batch: int) -> torch.Tensor:
        """The current task ids, checked against the batch size seen by layer ``who``."""
        if self.task_ids is None:
            raise ValueError(f"{who} needs per-sample task ids: pass task_ids=... to forward/generate")
        if self.task_ids.shape[0] != batch:
            raise ValueError(f"{who}: the batch has {batch} rows but task_ids has {self.task_ids.shape[0]} entries")
        return self.task_ids


def per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast per-sample values (batch, ...) against activations (batch, [seq,] features)."""
    extra = x.dim() - 2
    return values.reshape(values.shape[0], *([1] * extra), *values.shape[1:])
