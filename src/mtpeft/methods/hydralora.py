"""HydraLoRA (Tian et al., NeurIPS 2024): shared down-projection A, N up-projection heads B_i, a token router.

h = W0 x + s * sum_i pi_i(x) B_i A dropout(x), with pi(x) = softmax(W_r x) per token, W_r a bias-free linear
(Kaiming-uniform), A Kaiming-uniform and every B_i zero, so the adapted model starts equal to the base.

Options beyond the original:

- ``routing_group_size``: fine-grained routing (FGR, from mtLoRA): the router gives one softmax over the heads
  for every contiguous group of ``routing_group_size`` output channels (G = out_features / group_size groups,
  router output index g*N + i). ``None`` or a size >= out_features is scalar routing (the original);
  ``'auto'`` is ``routing_groups`` groups per module at any width (mtLoRA's component mode uses that).
- ``balance_weight``: the CV^2 load-balance loss (off by default, as the original returns a zero balance loss;
  mtLoRA's HydraLoRA baseline uses 0.01). CV^2 = var / mean^2 of the mean routing weight per head, the mean
  taken over batch, tokens (padding masked) and groups; ``var`` is the unbiased variance (torch's default, as
  the released mtLoRA code), plus 1e-10 in the denominator.

No task ids. Routing depends on the input, so the model cannot be merged; ``export_peft(rank=k,
calibration=...)`` exports the expected update sum_i E[pi_i] B_i A truncated to rank k (``mtpeft.io.approx``).

This module also holds the routing pieces that mtLoRA and token-gated MoE-LoRA reuse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, help_field
from ..core.context import TaskContext
from ..core.layers import LinearAdapter
from ..core.lowrank import add_low_rank
from ..core.routing import (
    SharedDownRoutedMixin,
    balance_aux_loss,
    check_expert_options,
    grouped_softmax,
    routed_layers,
    routing_groups,
)
from ..errors import MergeError
from ..registry import MethodSpec, register_method


@dataclass
class HydraLoRAConfig(AdapterConfig):
    """HydraLoRA: shared A, N up-projection heads, per-token router; input-routed, not mergeable."""

    method = "hydralora"
    num_experts: int = help_field("Number N of up-projection heads B_i (HydraLoRA's script: 4; mtLoRA's baseline: 16).",
                                  default=4)
    routing_group_size: int | str | None = help_field("Fine-grained routing: one softmax over heads per group of this "
                                                      "many output channels. None (or a value >= out_features) is "
                                                      "scalar routing as the original; 'auto' is `routing_groups` "
                                                      "groups per module; otherwise it must divide out_features of "
                                                      "every target module.", default=None)
    routing_groups: int = help_field("With routing_group_size='auto': the number G of routing groups per module.",
                                     default=2)
    balance_weight: float = help_field("Weight of the CV^2 load-balance loss (0 = off, as the original; mtLoRA's "
                                       "baseline: 0.01).", default=0.0)

    def validate(self) -> None:
        super().validate()
        check_expert_options(self)
        self.check_min("balance_weight", 0)


class HydraLoRALinear(SharedDownRoutedMixin, LinearAdapter):
    """A linear with HydraLoRA. Parameters: ``lora_A`` (r x d_in), ``lora_B`` (E x d_out x r, zero at init),
    ``lora_router`` (G*E x d_in, bias-free, Kaiming-uniform)."""

    def __init__(self, base_layer: nn.Linear, config: HydraLoRAConfig, context: TaskContext,
                 name: str = "") -> None:
        super().__init__(base_layer, config, context, name)
        groups = routing_groups(self.out_features, config.routing_group_size, f" of module {name!r}" if name else "",
                                config.routing_groups)
        self.init_routed_parameters(self.in_features, self.out_features, config, groups, self.factory_kwargs)

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        return self.routed_delta(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """W0 x + ``routed_delta(x)``; with scalar routing over an fp32 base the routed update goes into the base
        output by one addmm (LoRA's fast path): w = pi kron z (E*r wide) times the experts' B_e^T stacked."""
        out = self.base_layer(x)
        if self.merged:
            return out
        if self.num_groups != 1 or out.dtype != self.lora_B.dtype:
            return out + self.routed_delta(x).to(out.dtype)
        h = x.to(self.lora_A.dtype)
        if isinstance(self.dropout, nn.Identity):
            # A and the router read the same input: one (r + E)-wide GEMM instead of two r- and E-wide ones,
            # forward and backward (measured 1.6-2.3x faster on the CPU, r = E = 8, 1024 tokens; one dx sum fewer)
            both = F.linear(h, torch.cat([self.lora_A, self.lora_router]))
            z, logits = both.split([self.lora_A.shape[0], self.num_experts], -1)
        else:
            z = F.linear(self.dropout(h), self.lora_A)
            logits = F.linear(h, self.lora_router)
        pi = grouped_softmax(logits, 1, self.num_experts)
        self.record_routing(pi)
        w = (pi[..., 0, :, None].to(z.dtype) * z[..., None, :]).flatten(-2)  # (..., E*r), expert-major
        up_t = self.lora_B.permute(0, 2, 1).reshape(-1, self.out_features)  # row e*r + j: column j of B_e
        return add_low_rank(out, w, up_t, self.scale)

    def expert_matrices(self) -> list[torch.Tensor]:
        """The experts' up-projections B_e (d_out x r), for the spectral regularizer."""
        return list(self.lora_B.unbind(0))

    def expected_delta_weight(self, mean_pi: torch.Tensor) -> torch.Tensor:
        """The update for fixed routing weights ``mean_pi`` (G, E): group g's rows get sum_e pi_ge s B_e A."""
        size = -(-self.out_features // self.num_groups)  # the last 'auto' group is shorter on an uneven width
        rows = mean_pi.to(self.lora_B.dtype).repeat_interleave(size, dim=0)[: self.out_features]
        b_mix = torch.einsum("oe,eor->or", rows, self.lora_B)
        return (b_mix * self.scale) @ self.lora_A

    def lora_factors(self, task: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        raise MergeError(f"{self.module_name or 'this layer'}: the HydraLoRA update depends on each token's "
                         f"routing, so it has no fixed LoRA factors; use mtpeft.io.approx.approximate_factors")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, experts={self.num_experts}, groups={self.num_groups}"


def create_layer(base_layer: nn.Linear, config: HydraLoRAConfig, context: TaskContext,
                 name: str) -> HydraLoRALinear:
    """Wrap one linear with a HydraLoRA layer."""
    return HydraLoRALinear(base_layer, config, context, name)


def aux_losses(model) -> dict[str, tuple[torch.Tensor, float]]:
    """The CV^2 balance loss (reported always, weighted by ``balance_weight``)."""
    return balance_aux_loss(model)


def describe(model) -> str:
    """One line about the heads and routing."""
    layers = routed_layers(model)
    groups = sorted({m.num_groups for m in layers})
    cfg = model.adapter_config
    return (f"HydraLoRA: {len(layers)} adapted linears, {cfg.num_experts} heads, rank {cfg.r}, "
            f"routing groups per layer {groups}, balance weight {cfg.balance_weight:g}")


register_method(MethodSpec(
    name="hydralora", config_class=HydraLoRAConfig, create_layer=create_layer, aux_losses=aux_losses,
    describe=describe, merge="none",
    description="Shared A, N up-projection heads mixed by a per-token router; approximate export only.",
))
