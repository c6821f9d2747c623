"""What every adapter layer shares: the task context hand-off, the linear-adapter protocol, target matching.

An adapter layer wraps one frozen ``nn.Linear`` (kept as ``base_layer``) and adds a method-specific update.
The per-sample task ids of the current batch reach every layer through one :class:`TaskContext` that the
:class:`~mtpeft.model.MTModel` sets before it calls the base model, so the base model's own forward code
needs no change.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import AdapterConfig, ConfigError
from .quant import dense_weight


class TaskContext:
    """Per-forward state shared by all adapter layers of one model.

    ``task_ids``: LongTensor (batch,) or None. ``token_mask``: the attention mask (batch, seq) or None, for
    losses that must ignore padding. ``collect``: layers cache what the auxiliary losses need (training only).
    ``global_step``: the optimizer step, for regularizers applied every k steps.

    The values stay set after a forward returns, so that activation checkpointing can recompute the forward
    during backward with the same task ids; the next forward overwrites them.
    """

    def __init__(self) -> None:
        self.task_ids: torch.Tensor | None = None
        self.token_mask: torch.Tensor | None = None
        self.collect: bool = False
        self.global_step: int = 0

    def require_task_ids(self, who: str, batch: int) -> torch.Tensor:
        """The current task ids, checked against the batch size seen by layer ``who``."""
        if self.task_ids is None:
            raise ValueError(f"{who} needs per-sample task ids: pass task_ids=... to forward/generate")
        if self.task_ids.shape[0] != batch:
            raise ValueError(f"{who}: the batch has {batch} rows but task_ids has {self.task_ids.shape[0]} entries")
        return self.task_ids


def init_down_projection(weight: torch.Tensor, init: str, rank: int) -> None:
    """Initialize a down-projection A (rank x d_in) in place: Kaiming-uniform (a=sqrt(5)) or Gaussian (std 1/r)."""
    with torch.no_grad():
        if init == "kaiming":
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(weight, std=1.0 / rank)
        else:
            raise ConfigError(f"unknown init {init!r}; expected 'kaiming' or 'gaussian'")


def adapter_dtype(base_weight: torch.Tensor) -> torch.dtype:
    """Adapters train in fp32 (fp64 on an fp64 base) even over a half-precision base, as PEFT does."""
    return torch.float64 if base_weight.dtype == torch.float64 else torch.float32


class LinearAdapter(nn.Module):
    """Base of the adapter layers that wrap one linear.

    Subclasses implement ``adapter_output(x)`` (the scaled update, any shape ``(..., d_out)``) and
    ``lora_factors(task)`` returning ``(A, B)`` with ``B @ A`` equal to the task's weight update, the scale
    folded into B. ``delta_weight``, merging and PEFT export are derived from ``lora_factors``.
    """

    def __init__(self, base_layer: nn.Linear, config: AdapterConfig, context: TaskContext, name: str = "") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.scale = config.scale
        self.module_name = name
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # A plain attribute, not a submodule: the context is shared by every layer and holds no parameters.
        self.context = context
        self.merged = False

    @property
    def factory_kwargs(self) -> dict:
        weight = self.base_layer.weight
        return {"device": weight.device, "dtype": adapter_dtype(weight)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        return out + self.adapter_output(x).to(out.dtype)

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def lora_factors(self, task: int | None) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def delta_weight(self, task: int | None = None) -> torch.Tensor:
        """The weight update (d_out x d_in) that this adapter adds for ``task``."""
        a, b = self.lora_factors(task)
        return b @ a

    def merged_weight(self, task: int | None = None) -> torch.Tensor:
        """Base weight plus this task's update, computed in fp32 and cast to the base dtype (a 4-/8-bit base
        weight is dequantized first, and the result stays in its dequantized dtype)."""
        w = dense_weight(self.base_layer)
        delta = self.delta_weight(task)
        return (w.to(delta.dtype) + delta).to(w.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, scale={self.scale:g}"


def per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast per-sample values (batch, ...) against activations (batch, [seq,] features)."""
    extra = x.dim() - 2
    return values.reshape(values.shape[0], *([1] * extra), *values.shape[1:])
