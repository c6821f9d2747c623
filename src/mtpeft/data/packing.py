"""Packing: the tokenized examples of a training batch, of any tasks, concatenated into as few rows as fit.

Multi-task mixtures are mostly short examples, so a padded batch is mostly padding. A packed batch puts several
examples into one row of at most ``max_length`` tokens (first-fit, longest example first) and carries per token
what the padded batch carries per row:

- ``input_ids`` and ``labels`` (-100 on prompt and padding tokens, as in the padded path, and on the first token
  of every example, which nothing in its own example precedes: in a padded row that token is never a target
  either, so both batches have the same target tokens and the token-mean loss is the same);
- ``position_ids`` restarting at 0 for every example (and for the padding after the last one);
- ``task_ids`` (rows, seq): each token's task (padding takes the task of its row's last example);
- ``segment_ids`` (rows, seq): which example of its row each token belongs to, 0, 1, ... in row order, -1 on
  padding.

There is no ``attention_mask``: given ``segment_ids`` the model (:meth:`mtpeft.model.MTModel.forward`) leaves
it None and turns the KV cache off, and transformers then keeps attention inside each example from the
restarting ``position_ids`` (a block-diagonal causal mask for eager and sdpa, variable-length kernels for flash
attention).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Label value ignored by the loss (also exported by :mod:`mtpeft.data.collator`).
IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "first_fit", "pack_encoded", "real_token_count"]


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of example indices: each example, longest first, goes into the first row with room for it
    (first-fit decreasing); within a row the indices are in batch order.

    Raises:
        ValueError: an example is longer than ``capacity``.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        if lengths[i] > capacity:
            raise ValueError(f"example {i} has {lengths[i]} tokens, more than the row length {capacity}")
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return [sorted(row) for row in rows]


def pack_encoded(encoded: Sequence[tuple[list[int], list[int]]], task_ids: Sequence[int], max_length: int,
                 pad_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Pack encoded examples ``(input_ids, labels)`` with their task ids into rows of at most ``max_length``
    tokens: LongTensors ``input_ids``, ``labels``, ``position_ids``, ``task_ids`` and ``segment_ids`` (see the
    module docstring), as wide as the longest row, rounded up to a multiple of ``pad_to_multiple_of``."""
    if not encoded:
        raise ValueError("cannot pack an empty batch")
    rows = first_fit([len(ids) for ids, _ in encoded], max_length)
    width = max(sum(len(encoded[i][0]) for i in row) for row in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    shape = (len(rows), width)
    out = {"input_ids": torch.full(shape, pad_id, dtype=torch.long),
           "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
           "position_ids": torch.zeros(shape, dtype=torch.long),
           "task_ids": torch.zeros(shape, dtype=torch.long),
           "segment_ids": torch.full(shape, -1, dtype=torch.long)}
    for r, row in enumerate(rows):
        start = 0
        for segment, i in enumerate(row):
            ids, labels = encoded[i]
            end = start + len(ids)
            out["input_ids"][r, start:end] = torch.tensor(ids, dtype=torch.long)
            out["labels"][r, start:end] = torch.tensor(labels, dtype=torch.long)
            out["labels"][r, start] = IGNORE_INDEX
            out["position_ids"][r, start:end] = torch.arange(len(ids))
            out["task_ids"][r, start:end] = int(task_ids[i])
            out["segment_ids"][r, start:end] = segment
            start = end
        out["position_ids"][r, start:] = torch.arange(width - start)
        out["task_ids"][r, start:] = int(task_ids[row[-1]])
    return out


def real_token_count(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The number of real (non-padding) tokens of a padded or a packed batch, as a float scalar tensor."""
    if "segment_ids" in batch:
        return (batch["segment_ids"] >= 0).sum().float()
    return batch["attention_mask"].sum().float()
