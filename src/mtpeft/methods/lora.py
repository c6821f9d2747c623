"""Plain LoRA: h = W0 x + s * B A dropout(x). The baseline every multi-task method is compared with.

Two variants, as PEFT has them (and exported in PEFT's format):

- ``use_dora`` (DoRA, Liu et al. 2024): the adapted weight W0 + s B A is split into a direction and a
  trained magnitude per output row m: h = m / ||W0 + s B A||_row * (W0 + s B A) x, the norm detached from the
  gradient as in the paper and PEFT. A merge folds it in exactly; the export writes ``use_dora: true`` and m as
  ``lora_magnitude_vector``.
- ``init_from_weights`` 'pissa' (Meng et al. 2024) / 'olora' (Büyükakyüz 2024): A and B start from the base
  weight's principal part (top-r SVD; QR). PEFT then subtracts s B0 A0 from the base weight; here the base weight
  stays as loaded and the layer subtracts the frozen initial s B0 A0 itself (the same function), so saving
  needs no modified base model, and a merge or export is the plain LoRA ``[A; A0], [s B, -s B0]`` of rank 2r:
  PEFT's own rule for converting PiSSA/OLoRA to LoRA on save (``path_initial_model_for_weight_conversion``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, help_field
from ..core.context import TaskContext
from ..core.layers import LinearAdapter
from ..core.lowrank import WEIGHT_INITS, add_low_rank, factors_from_weight, init_down_projection
from ..registry import MethodSpec, register_method


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA (Hu et al. 2021): one shared low-rank update, task-agnostic, merges globally."""

    method = "lora"

    use_dora: bool = help_field("DoRA: a trained magnitude per output row over the normalized adapted weight (as "
                                "PEFT's use_dora); merges and exports exactly.", default=False)
    init_from_weights: str | None = help_field(
        "Start A and B from the base weight: 'pissa' (its top-r singular vectors) or 'olora' (its QR "
        "decomposition), as PEFT's init_lora_weights; the frozen initial part is subtracted, so the model starts "
        "equal to the base. Merges and exports as a plain LoRA of rank 2r. null = `init` (B = 0).", default=None)

    def validate(self) -> None:
        super().validate()
        self.check("init_from_weights", self.init_from_weights in (None, *WEIGHT_INITS),
                   f"null or one of {list(WEIGHT_INITS)}")
        self.check("use_dora", not (self.use_dora and self.init_from_weights),
                   "false with init_from_weights (DoRA over a PiSSA/OLoRA start is not supported)")
        # DoRA rescales the whole output, around the down-projection that Align-LoRA's loss reads
        self.check("use_dora", not self.use_dora or self.method == "lora", "false for methods other than 'lora'")


class LoRALinear(LinearAdapter):
    """A linear with a LoRA update. Parameters: ``lora_A`` (r x d_in) and ``lora_B`` (d_out x r, zero at init);
    with DoRA also ``lora_magnitude_vector`` (d_out); with PiSSA/OLoRA the frozen buffers ``init_A``/``init_B``."""

    def __init__(self, base_layer: nn.Linear, config: AdapterConfig, context: TaskContext, name: str = "") -> None:
        super().__init__(base_layer, config, context, name)
        self.use_dora = bool(getattr(config, "use_dora", False))
        weight_init = getattr(config, "init_from_weights", None)
        self.lora_A = nn.Parameter(torch.empty(config.r, self.in_features, **self.factory_kwargs))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.r, **self.factory_kwargs))
        # Not saved: the same base weight gives the same product B0 A0 (each singular pair's sign cancels).
        self.register_buffer("init_A", None, persistent=False)
        self.register_buffer("init_B", None, persistent=False)
        if weight_init:
            a0, b0 = factors_from_weight(self.base_weight(), config.r, self.scale, weight_init)
            with torch.no_grad():
                self.lora_A.copy_(a0)
                self.lora_B.copy_(b0)
            self.init_A = a0.to(self.lora_A.dtype)
            self.init_B = b0.to(self.lora_B.dtype)
        else:
            init_down_projection(self.lora_A, config.init, config.r)
        if self.use_dora:
            with torch.no_grad():
                norm = torch.linalg.norm(self.base_weight().to(self.lora_A.dtype), dim=1)
            self.lora_magnitude_vector = nn.Parameter(norm.to(**self.factory_kwargs))

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """A dropout(x): the rank-r adapter representation."""
        return F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(self.down(x), self.lora_B) * self.scale
        if self.init_A is not None:
            out = out - F.linear(F.linear(x.to(self.init_A.dtype), self.init_A), self.init_B) * self.scale
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        if self.use_dora:
            return out + self._dora_output(x, out).to(out.dtype)
        if self.init_A is not None:
            out = add_low_rank(out, F.linear(x.to(self.init_A.dtype), self.init_A), self.init_B.t(), -self.scale)
        return add_low_rank(out, self.down(x), self.lora_B.t(), self.scale)

    def _dora_magnitude_scale(self, weight: torch.Tensor, update: torch.Tensor | None = None) -> torch.Tensor:
        """m / ||W0 + s B A||_row, the norm detached (DoRA section 4.3); ``update`` stands for s B A if given."""
        update = self.scale * (self.lora_B @ self.lora_A) if update is None else update
        norm = torch.linalg.norm(weight + update, dim=1).detach()
        return self.lora_magnitude_vector / norm

    def _dora_output(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to the base output: (m/||.|| - 1) W0 x' + m/||.|| s B A x', as PEFT's DoRA layer (x' is
        the dropped-out input in training with dropout, else the base output itself stands for W0 x)."""
        weight = self.base_weight().to(self.lora_A.dtype)
        mag = self._dora_magnitude_scale(weight)
        dropped = self.dropout(x.to(self.lora_A.dtype))
        lora = F.linear(F.linear(dropped, self.lora_A), self.lora_B) * self.scale
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base = base_out.to(weight.dtype)
            bias = getattr(self.base_layer, "bias", None)
            if bias is not None:
                base = base - bias.to(weight.dtype)
        else:
            base = F.linear(dropped, weight)
        return (mag - 1) * base + mag * lora

    def lora_factors(self, task: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, s B); with PiSSA/OLoRA (``[A; A0]``, ``[s B, -s B0]``). For DoRA these are the factors its PEFT
        export writes beside the magnitude; the weight update itself is :meth:`delta_from_factors` of them."""
        if self.init_A is None:
            return self.lora_A, self.lora_B * self.scale
        return (torch.cat([self.lora_A, self.init_A], dim=0),
                torch.cat([self.lora_B * self.scale, -self.init_B * self.scale], dim=1))

    def delta_from_factors(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """With DoRA the magnitude renormalizes the rows: m/||W0 + B A||_row (W0 + B A) - W0, as PEFT computes it
        from exported factors (a rank-truncated export changes the norm too, not only B A)."""
        if not self.use_dora:
            return super().delta_from_factors(a, b)
        weight = self.base_weight().to(self.lora_A.dtype)
        update = b.to(weight.dtype) @ a.to(weight.dtype)
        return self._dora_magnitude_scale(weight, update)[:, None] * (weight + update) - weight

    def peft_extras(self) -> tuple[dict, dict[str, torch.Tensor]]:
        options, tensors = super().peft_extras()
        if self.use_dora:
            options["use_dora"] = True
            tensors["lora_magnitude_vector"] = self.lora_magnitude_vector.detach()
        return options, tensors


def create_layer(base_layer: nn.Linear, config: LoRAConfig, context: TaskContext, name: str) -> LoRALinear:
    """Wrap one linear with a LoRA layer."""
    return LoRALinear(base_layer, config, context, name)


register_method(MethodSpec(
    name="lora", config_class=LoRAConfig, create_layer=create_layer, merge="global",
    description="Plain LoRA: one shared update for all tasks; merges globally.",
))
