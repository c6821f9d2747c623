"""Plain LoRA: h = W0 x + s * B A dropout(x). The baseline every multi-task method is compared with."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, MethodSpec, register_method
from ..core.layers import LinearAdapter, TaskContext, init_down_projection


def add_low_rank(out: torch.Tensor, z: torch.Tensor, up_t: torch.Tensor, scale: float) -> torch.Tensor:
    """out + scale * z @ up_t, added in place of a separate delta tensor: ``out`` (..., d_out), ``z`` (..., k),
    ``up_t`` (k, d_out) (B^T of a LoRA, or a routed layer's side-by-side expert up-projections)."""
    b_t = up_t.to(out.dtype)
    if out.device.type == "cpu":
        # A contiguous (k, d_out) copy of B^T (k * d_out values): both backward matmuls, dB^T = z^T dy and
        # dz = dy B, then read row-major operands, which MKL runs 2-4x faster for rank-r shapes than the
        # transposed ones autograd picks for a view (measured: -3% tiny-Llama training step time on CPU).
        b_t = b_t.contiguous()
    # One addmm adds s * z B^T into the base output without a separate delta tensor (lean LoRA).
    fused = torch.addmm(out.reshape(-1, out.shape[-1]), z.reshape(-1, z.shape[-1]).to(out.dtype), b_t, alpha=scale)
    return fused.view(out.shape)


def add_update(out: torch.Tensor, z: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """out + scale * z B^T for a layer whose down-projection gave ``z``: by :func:`add_low_rank` when the base
    output has the adapter's dtype; over a half-precision base the update is computed in the adapter's dtype
    and cast, as ``adapter_output`` does."""
    if out.dtype != z.dtype:
        return out + (F.linear(z, lora_b) * scale).to(out.dtype)
    return add_low_rank(out, z, lora_b.t(), scale)


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
