"""Packed rows: several examples in one row, told apart by per-token segment ids (-1 on padding).

The base model keeps attention inside each example by itself: transformers finds the examples of a row from
``position_ids`` that restart at 0 (``masking_utils.find_packed_sequence_indices``) and builds block-diagonal
masks from them, for every attention implementation, but only when the 2D ``attention_mask`` is None and no KV
cache is in use (a cache makes it skip the check, and most models create one unless ``use_cache=False``).
:func:`packed_inputs` sets the forward up that way. :func:`unpack_segments` lays packed per-token values out as
a padded batch, one row per example, for the losses that compare or pool samples.
"""

from __future__ import annotations

from typing import Any

import torch


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Each token's position inside its example (batch, seq), restarting at 0 for every segment; the padding
    after the last example counts from 0 too, as a segment of its own."""
    seq = segment_ids.shape[1]
    cols = torch.arange(seq, device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    # the start column of the segment each token is in: a running maximum over the segment starts
    start_col = torch.where(starts, cols, torch.zeros_like(cols)).cummax(dim=1).values
    return cols - start_col


def packed_inputs(segment_ids: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict[str, Any]) -> None:
    """Check a packed forward's inputs and set ``kwargs`` up so that the base model keeps attention inside each
    example: no 2D attention mask, ``use_cache=False``, and ``position_ids`` from the segments when not given."""
    if attention_mask is not None:
        raise ValueError("packed rows (segment_ids) need attention_mask=None: the base model keeps attention inside "
                         "each example from position_ids that restart at 0")
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be (batch, seq), got shape {tuple(segment_ids.shape)}")
    if kwargs.get("use_cache"):
        raise ValueError("packed rows (segment_ids) cannot use the KV cache: pass use_cache=False or leave it unset")
    kwargs["use_cache"] = False  # with a cache transformers skips the packed-sequence check (masking_utils)
    if kwargs.get("position_ids") is None:
        kwargs["position_ids"] = segment_positions(segment_ids)


def unpack_segments(values: torch.Tensor, segment_ids: torch.Tensor,
                    task_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed per-token ``values`` (batch, seq, ...) as a right-padded batch with one row per example: (values
    (G, L, ...) zero on padding, mask (G, L), per-example task ids (G,)), G examples of up to L tokens, in row
    order and within a row in order. Differentiable in ``values``.

    ``task_ids`` is per token (batch, seq); every token of an example carries the example's id.
    """
    valid = segment_ids >= 0
    per_row = segment_ids.max(dim=1).values.clamp_min(-1) + 1  # examples in each row
    offsets = per_row.cumsum(0) - per_row
    example = (offsets[:, None] + segment_ids)[valid]  # each real token's example index, in 0..G-1
    position = segment_positions(segment_ids)[valid]
    count = int(per_row.sum())
    width = int(position.max()) + 1 if position.numel() else 0
    out = values.new_zeros(count, width, *values.shape[2:]).index_put((example, position), values[valid])
    mask = torch.zeros(count, width, dtype=torch.long, device=values.device)
    mask[example, position] = 1
    ids = torch.zeros(count, dtype=task_ids.dtype, device=task_ids.device)
    ids[example] = task_ids[valid]
    return out, mask, ids
