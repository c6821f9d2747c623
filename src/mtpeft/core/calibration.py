"""Per-task calibration statistics of adapted layers (ThanoRA's rank allocation): the input tokens or the
accumulated weight gradient of each layer over one task's rows of a few collated batches, and the
duplicate-free, equal-count token subsample that makes SV-entropy scores comparable across tasks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import distributed


def distinct_token_subsample(x: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """At most ``count`` of the distinct rows of ``x`` (tokens x d), a uniform random subset seeded by ``seed``.

    Identical rows (a repeated example, a shared template's tokens with the same context) count once, and the
    rows are put in a canonical (sorted) order before the draw, so the result does not depend on how often or
    in which order the tokens were seen: duplicating a task's calibration data changes nothing.
    """
    x = torch.unique(x, dim=0)
    if x.shape[0] > count:
        x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(int(seed)))[:count]]
    return x


def task_batches(batches: list[tuple[int, dict[str, Any]]], task: int, device: torch.device,
                  keys: tuple[str, ...]):
    """For each ``(index, batch)`` with rows of ``task``: (index, sub-batch on ``device`` restricted to ``keys``,
    task ids)."""
    for index, batch in batches:
        rows = batch["task_ids"].reshape(-1).cpu() == task
        if not rows.any():
            continue
        missing = [k for k in keys if k not in batch]
        if missing:
            raise ValueError(f"calibration batches need {missing} (complexity='gradients' needs labels)")
        yield index, {k: batch[k][rows.to(batch[k].device)].to(device) for k in keys}, batch["task_ids"][rows]


def in_batch_order(chunks: dict[int, torch.Tensor], width: int, device: torch.device) -> torch.Tensor | None:
    """Every process's activation chunks, keyed by global batch index, concatenated in batch order (what one
    process holding all the batches would have); the local chunks in a single process."""
    if not distributed.is_distributed():
        return torch.cat([chunks[i] for i in sorted(chunks)], 0) if chunks else None
    order = sorted(chunks)
    local = torch.cat([chunks[i] for i in order], 0) if order else torch.zeros(0, width)
    meta = torch.tensor([[i, chunks[i].shape[0]] for i in order], dtype=torch.long).reshape(-1, 2)
    rows = distributed.gather_rows(local.to(device)).cpu()
    index = distributed.gather_rows(meta.to(device)).cpu()
    pieces, start = {}, 0
    for i, n in index.tolist():
        pieces[i] = rows[start:start + n]
        start += n
    return torch.cat([pieces[i] for i in sorted(pieces)], 0) if pieces else None


@torch.no_grad()
def collect_activations(model, layers: dict[str, nn.Module], batches: list[tuple[int, dict]],
                        task: int) -> dict[str, torch.Tensor]:
    """Every non-padding input token (rows) of each layer in ``layers`` over ``task``'s rows of ``batches``
    (``(index, batch)`` pairs), in batch order, gathered over processes; fp32 on the CPU."""
    store: dict[str, dict[int, torch.Tensor]] = {n: {} for n in layers}
    current: dict[str, Any] = {"mask": None, "index": -1}
    hooks = []

    def make_hook(name: str):
        def hook(module, args):
            x = args[0]
            flat = x.reshape(-1, x.shape[-1])
            m = current["mask"]
            if m is not None and x.dim() == 3 and m.shape == x.shape[:2]:
                flat = flat[m.reshape(-1).bool()]
            store[name][current["index"]] = flat.detach().float().cpu()
        return hook

    for name, layer in layers.items():
        hooks.append(layer.register_forward_pre_hook(make_hook(name)))
    try:
        for index, inputs, task_ids in task_batches(batches, task, model.device, ("input_ids", "attention_mask")):
            current["mask"], current["index"] = inputs["attention_mask"], index
            model(**inputs, task_ids=task_ids)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, chunks in store.items():
        x = in_batch_order(chunks, layers[name].in_features, model.device)
        if x is not None:
            out[name] = x
    return out


def collect_gradients(model, layers: dict[str, nn.Module], batches: list[tuple[int, dict]],
                      task: int) -> dict[str, torch.Tensor]:
    """Each layer's accumulated gradient of its frozen weight, (d_out, d_in), over ``task``'s rows of
    ``batches`` (summed over processes)."""
    grads: dict[str, torch.Tensor] = {}
    hooks = []

    def make_hook(name: str):
        def hook(module, args, output):
            x = args[0].detach()

            def on_grad(g):
                contribution = g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
                grads[name] = grads[name] + contribution if name in grads else contribution
            if output.requires_grad:
                output.register_hook(on_grad)
        return hook

    for name, layer in layers.items():
        hooks.append(layer.register_forward_hook(make_hook(name)))
    try:
        keys = ("input_ids", "attention_mask", "labels")
        for _, inputs, _ in task_batches(batches, task, model.device, keys):
            with torch.enable_grad():
                out = model.base_model(**inputs)
                out.loss.backward()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    if distributed.is_distributed():  # each process saw some of the batches: sum their gradients
        grads = {name: distributed.all_reduce_sum(
            grads.get(name, torch.zeros(layer.out_features, layer.in_features, device=model.device)))
            for name, layer in layers.items()}
    return grads
