"""A run's optimizer and learning-rate schedule: AdamW over the model's parameter groups, warmup then decay."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["build_optimizer", "build_scheduler"]

_SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def build_optimizer(model: Any, lr: float, weight_decay: float) -> tuple[torch.optim.Optimizer, list[Any], list[int]]:
    """AdamW over ``model.param_groups(lr, weight_decay)`` (a method may give some parameters their own rate),
    with the optimized parameters in order and each group's size: DeepSpeed replaces the groups' parameters by
    flat partitions, and the checkpoint still names them by position."""
    optimizer = torch.optim.AdamW(model.param_groups(lr, weight_decay), lr=lr)
    optimized = [p for group in optimizer.param_groups for p in group["params"]]
    return optimizer, optimized, [len(group["params"]) for group in optimizer.param_groups]


def build_scheduler(optimizer: torch.optim.Optimizer, train: Any) -> Any:
    """The schedule of a run config's ``train`` section: linear warmup over ``warmup_ratio`` of the steps, then
    ``schedule`` (cosine, linear, or constant)."""
    from transformers import get_scheduler

    warmup = int(math.ceil(train.warmup_ratio * train.steps))
    return get_scheduler(_SCHEDULES[train.schedule], optimizer, num_warmup_steps=warmup,
                         num_training_steps=train.steps)
