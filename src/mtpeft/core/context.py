"""The per-forward task context every adapter layer of one model shares.

The task ids of the current batch reach every layer through one :class:`TaskContext` that the
:class:`~mtpeft.model.MTModel` sets before it calls the base model, so the base model's own forward code
needs no change. They are per sample, (batch,), or per token, (batch, seq): packed rows
(:mod:`mtpeft.data.packing`) hold examples of several tasks in one row, so every layer that indexes a
task-specific weight gathers it per token there.
"""

from __future__ import annotations

import torch


class TaskContext:
    """Per-forward state shared by all adapter layers of one model.

    ``task_ids``: LongTensor (batch,) or (batch, seq) or None. ``token_mask``: the attention mask (batch, seq) or
    None, for losses that must ignore padding (for packed rows: 1 on every example's tokens, 0 on padding).
    ``segment_ids``: for packed rows, which example of its row each token belongs to (batch, seq), -1 on padding;
    None for ordinary rows (one example each). ``collect``: layers cache what the auxiliary losses need (training
    only). ``global_step``: the optimizer step, for regularizers applied every k steps. ``total_steps``: the run's
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
        self.segment_ids: torch.Tensor | None = None
        self.collect: bool = False
        self.global_step: int = 0
        self.total_steps: int | None = None
        self.micro_step: int = 0
        self.counters: dict[str, int] = {}

    def set_batch(self, task_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, collect: bool,
                  segment_ids: torch.Tensor | None = None) -> None:
        """Set this forward's task ids, token mask and (for packed rows) segment ids. With ``segment_ids``, per-row
        ids are spread over the row's tokens and the token mask is ``segment_ids >= 0``."""
        if segment_ids is not None:
            if task_ids is not None and task_ids.dim() == 1:
                task_ids = task_ids[:, None].expand(segment_ids.shape)
            if task_ids is not None and tuple(task_ids.shape) != tuple(segment_ids.shape):
                raise ValueError(f"per-token task_ids {tuple(task_ids.shape)} do not match segment_ids "
                                 f"{tuple(segment_ids.shape)}")
            attention_mask = (segment_ids >= 0).long()
        self.task_ids, self.token_mask, self.segment_ids, self.collect = task_ids, attention_mask, segment_ids, collect

    def count(self, name: str, by: int = 1) -> None:
        """Add ``by`` to the run counter ``name`` (reported in the trainer's metrics and ``summary.json``)."""
        self.counters[name] = self.counters.get(name, 0) + by

    def require_task_ids(self, who: str, batch: int) -> torch.Tensor:
        """The current task ids, (batch,) or per token (batch, seq), checked against the batch size seen by layer
        ``who``."""
        if self.task_ids is None:
            raise ValueError(f"{who} needs per-sample task ids: pass task_ids=... to forward/generate")
        if self.task_ids.shape[0] != batch:
            raise ValueError(f"{who}: the batch has {batch} rows but task_ids has {self.task_ids.shape[0]} entries")
        return self.task_ids

    def task_ids_for(self, who: str, x: torch.Tensor) -> torch.Tensor:
        """The current task ids checked against activations ``x`` (batch, [seq,] features): per-token ids need
        ``x`` to be (batch, seq, features) with their seq."""
        ids = self.require_task_ids(who, x.shape[0])
        check_token_ids(ids, x, who)
        return ids


def check_token_ids(ids: torch.Tensor, x: torch.Tensor, who: str) -> None:
    """Per-token ids (batch, seq) need activations (batch, seq, features); per-sample ids pass."""
    if ids.dim() == 2 and (x.dim() != 3 or tuple(x.shape[:2]) != tuple(ids.shape)):
        raise ValueError(f"{who}: per-token task_ids {tuple(ids.shape)} do not match the activations "
                         f"{tuple(x.shape)} (batch, seq, features)")


def per_token(ids: torch.Tensor | None) -> bool:
    """Whether task ids are given per token (batch, seq) rather than per sample (batch,)."""
    return ids is not None and ids.dim() == 2


def per_sample(values: torch.Tensor, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Broadcast values looked up from task ids against activations (batch, [seq,] features): per-sample values
    (batch, ...) get singleton token dims; with per-token ``task_ids`` (batch, seq) the values are (batch, seq,
    ...) already and line up with (batch, seq, features) activations as they are."""
    if per_token(task_ids):
        check_token_ids(task_ids, x, "per_sample")
        return values
    extra = x.dim() - 2
    return values.reshape(values.shape[0], *([1] * extra), *values.shape[1:])
