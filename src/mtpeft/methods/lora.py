"""Plain LoRA: h = W0 x + s * B A dropout(x). The baseline every multi-task method is compared with."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig
from ..core.context import TaskContext
from ..core.layers import LinearAdapter
from ..core.lowrank import add_low_rank, init_down_projection
from ..registry import MethodSpec, register_method


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA (Hu et al. 2021): one shared low-rank update, task-agnostic, merges globally."""

    method = "lora"


class LoRALinear(LinearAdapter):
    """A linear with a LoRA update. Parameters: ``lora_A`` (r x d_in) and ``lora_B`` (d_out x r, zero at init)."""

    def __init__(self, base_layer: nn.Linear, config: AdapterConfig, context: TaskContext, name: str = "") -> None:
        super().__init__(base_layer, config, context, name)
        self.lora_A = nn.Parameter(torch.empty(config.r, self.in_features, **self.factory_kwargs))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.r, **self.factory_kwargs))
        init_down_projection(self.lora_A, config.init, config.r)

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """A dropout(x): the rank-r adapter representation."""
        return F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.down(x), self.lora_B) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        return add_low_rank(out, self.down(x), self.lora_B.t(), self.scale)

    def lora_factors(self, task: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A, self.lora_B * self.scale


def create_layer(base_layer: nn.Linear, config: LoRAConfig, context: TaskContext, name: str) -> LoRALinear:
    """Wrap one linear with a LoRA layer."""
    return LoRALinear(base_layer, config, context, name)


register_method(MethodSpec(
    name="lora", config_class=LoRAConfig, create_layer=create_layer, merge="global",
    description="Plain LoRA: one shared update for all tasks; merges globally.",
))
