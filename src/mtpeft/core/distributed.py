"""Data-parallel helpers: this process's shard of a global batch, and gathers/reductions that carry gradients.

Every function is the identity in a single process (no ``torch.distributed`` group, or a group of one), so
single-process code pays nothing and never needs a branch of its own.

Why the gradients come out right: an auxiliary loss computed from gathered (or summed) per-sample values is
the same number on every process. Backward through :func:`gather_rows` / :func:`all_reduce_sum` sums the
processes' identical gradients, i.e. multiplies this process's share by the world size, and the data-parallel
wrapper then averages the parameter gradients over the processes, which divides it again. The result equals
the gradient of the loss on one process over the whole global batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

Item = TypeVar("Item")


def is_distributed() -> bool:
    """True when a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's index (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def shard_batch(batch: Sequence[tuple[int, int]], rank: int, world: int) -> list[tuple[int, int]]:
    """This process's share of a global batch of ``(task, example)`` pairs.

    Each task's examples are dealt round-robin, so every process gets its share of every task and a
    task-balanced global batch stays balanced on each process. Raises when some process would get nothing.
    """
    if world <= 1:
        return list(batch)
    if len(batch) < world:
        raise ValueError(f"the global batch has {len(batch)} examples for {world} processes: set "
                         f"train.batch_size to at least the number of processes")
    by_task: dict[int, list[tuple[int, int]]] = {}
    for item in batch:
        by_task.setdefault(item[0], []).append(item)
    # Deal task by task from one running counter, so shard sizes differ by at most one.
    shard, position = [], 0
    for task in sorted(by_task):
        for item in by_task[task]:
            if position % world == rank:
                shard.append(item)
            position += 1
    return shard


def split_round_robin(items: Sequence[Item], rank: int, world: int) -> list[Item]:
    """Items ``rank, rank + world, ...``: a whole-item share (e.g. calibration batches) for this process."""
    return list(items[rank::world]) if world > 1 else list(items)


class _GatherRows(torch.autograd.Function):
    """Concatenate every process's rows (dim 0); other dims are zero-padded to the largest process's."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        shape = torch.tensor(tensor.shape, dtype=torch.long, device=tensor.device)
        shapes = [torch.empty_like(shape) for _ in range(world)]
        dist.all_gather(shapes, shape)
        shapes_list = [tuple(int(v) for v in s.tolist()) for s in shapes]
        target = [max(s[d] for s in shapes_list) for d in range(tensor.dim())]
        padded = tensor.new_zeros(target)
        padded[tuple(slice(0, n) for n in tensor.shape)] = tensor
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        ctx.rows = [s[0] for s in shapes_list]
        ctx.me = dist.get_rank()
        ctx.local_shape = tuple(tensor.shape)
        return torch.cat([p[:rows] for p, rows in zip(parts, ctx.rows)], 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every process holds the same loss: sum their gradients
        start = sum(ctx.rows[:ctx.me])
        mine = grad[start:start + ctx.rows[ctx.me]]
        return mine[tuple(slice(0, n) for n in ctx.local_shape)].contiguous()


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """All processes' rows in rank order, with gradients (dims after the first zero-padded to the maximum).

    Zero padding is meant for right-padded sequences whose masks are gathered the same way (padding reads as
    masked out). The identity in a single process.
    """
    if not is_distributed():
        return tensor
    return _GatherRows.apply(tensor)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = tensor.contiguous().clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes, with gradients (see the module docstring). The identity in a single process."""
    if not is_distributed():
        return tensor
    return _AllReduceSum.apply(tensor)


def all_reduce_mean_detached(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over processes of a value for logging or a decision every process must share (no gradient)."""
    if not is_distributed():
        return tensor.detach()
    out = tensor.detach().contiguous().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


@contextmanager
def fsdp_root_unsharded(module: nn.Module) -> Iterator[None]:
    """Keep an FSDP2 root module's own parameters whole inside the block (a no-op for other modules).

    FSDP2 gathers a unit's parameters in a hook on that unit's ``forward``. ``generate`` calls the base model
    past the root's forward, so the root's parameters (embeddings, output head, final norm) must be gathered
    here; the decoder layers are units of their own and gather as they run.
    """
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def whole_tensor(value: Any) -> Any:
    """An FSDP2-sharded parameter (a DTensor) as one whole tensor, with gradients; anything else unchanged.

    For regularizers that read adapter weights outside their layer's forward, where FSDP2 holds only this
    process's shard. Every process computes the same value; the gradient flows back to each process's shard.
    """
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor()
    return value
