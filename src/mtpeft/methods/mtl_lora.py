"""MTL-LoRA (Yang et al. 2024): shared A, task-specific Lambda_t, a pool of B mixed per task.

h_t = W0 x + s * (sum_i softmax(w_t / tau)_i B_i) Lambda_t A dropout(x). Lambda_t is a full r x r matrix
(identity at init) or a diagonal (ones). Task ids are needed in training and inference; the update is a fixed
matrix per task, so the model merges once per task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, help_field
from ..core.context import TaskContext
from ..core.layers import LinearAdapter
from ..core.lowrank import init_down_projection
from ..registry import MethodSpec, register_method


@dataclass
class MTLLoRAConfig(AdapterConfig):
    """MTL-LoRA: task-specific transformation of a shared low-rank space, B pool mixed per task."""

    method = "mtl_lora"
    num_up_projections: int = help_field("Size n of the pool of up-projections B_i.", default=3)
    temperature: float = help_field("Softmax temperature tau of the B-mixing weights.", default=0.1)
    diagonal_lambda: bool = help_field("Lambda_t diagonal (r parameters per task) instead of a full r x r matrix.",
                                       default=False)

    def validate(self) -> None:
        super().validate()
        self.check_min("num_up_projections", 1)
        self.check_min("temperature", 0, strict=True)

    def requires_tasks(self) -> bool:
        return True


class MTLLoRALinear(LinearAdapter):
    """Parameters: ``lora_A`` (r x d_in), ``lora_lambda`` (T x r x r or T x r), ``lora_B`` (n x d_out x r),
    ``mix_logits`` (T x n)."""

    def __init__(self, base_layer: nn.Linear, config: MTLLoRAConfig, context: TaskContext, name: str = "") -> None:
        super().__init__(base_layer, config, context, name)
        r, t, n = config.r, len(config.tasks), config.num_up_projections
        kw = self.factory_kwargs
        self.temperature = config.temperature
        self.diagonal = config.diagonal_lambda
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        init_down_projection(self.lora_A, config.init, r)
        lam = torch.ones(t, r, **kw) if self.diagonal else torch.eye(r, **kw).repeat(t, 1, 1)
        self.lora_lambda = nn.Parameter(lam)
        self.lora_B = nn.Parameter(torch.zeros(n, self.out_features, r, **kw))
        self.mix_logits = nn.Parameter(torch.empty(t, n, **kw))
        nn.init.kaiming_uniform_(self.mix_logits, a=math.sqrt(5))

    def task_lambda(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Lambda for each id, always as full matrices (k, r, r)."""
        lam = self.lora_lambda[task_ids]
        return torch.diag_embed(lam) if self.diagonal else lam

    def task_up(self, task_ids: torch.Tensor) -> torch.Tensor:
        """The mixed up-projection B_bar_t for each id, (k, d_out, r)."""
        weights = torch.softmax(self.mix_logits[task_ids] / self.temperature, dim=-1)  # (k, n)
        return torch.einsum("kn,ndr->kdr", weights, self.lora_B)

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.context.task_ids_for(f"MTL-LoRA ({self.module_name})", x)
        if ids.dim() == 2:
            return self._per_token_output(x, ids)
        squeeze = x.dim() == 2
        h = x[:, None, :] if squeeze else x.reshape(x.shape[0], -1, x.shape[-1])
        z = F.linear(self.dropout(h.to(self.lora_A.dtype)), self.lora_A)  # (b, n, r)
        z = torch.einsum("bnr,bqr->bnq", z, self.task_lambda(ids))
        out = torch.einsum("bnq,bdq->bnd", z, self.task_up(ids)) * self.scale
        return out[:, 0] if squeeze else out.reshape(*x.shape[:-1], self.out_features)

    def _per_token_output(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The update for per-token task ids (b, n) (packed rows): Lambda gathered per token (r x r, or r on the
        diagonal), and sum_i w_ti B_i z as one matmul over the pool side by side, (w_t kron z) [B_1 .. B_n]^T,
        rather than one mixed d_out x r matrix per token."""
        z = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)  # (b, n, r)
        lam = self.lora_lambda[ids]
        z = z * lam if self.diagonal else torch.einsum("bnr,bnqr->bnq", z, lam)
        weights = torch.softmax(self.mix_logits[ids] / self.temperature, dim=-1)  # (b, n, pool)
        wz = (weights[..., :, None] * z[..., None, :]).flatten(-2)  # (b, n, pool * r), pool-major
        pool, d_out, r = self.lora_B.shape
        return F.linear(wz, self.lora_B.permute(1, 0, 2).reshape(d_out, pool * r)) * self.scale

    def lora_factors(self, task: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        if task is None:
            raise ValueError("MTL-LoRA has one update per task: a task id is needed")
        ids = torch.tensor([task], device=self.lora_A.device)
        return self.task_lambda(ids)[0] @ self.lora_A, self.task_up(ids)[0] * self.scale


def create_layer(base_layer, config: MTLLoRAConfig, context: TaskContext, name: str) -> MTLLoRALinear:
    """Wrap one linear with an MTL-LoRA layer."""
    return MTLLoRALinear(base_layer, config, context, name)


register_method(MethodSpec(
    name="mtl_lora", config_class=MTLLoRAConfig, create_layer=create_layer, merge="per_task",
    task_ids_at_inference=True, task_ids_in_training=True,
    description="Shared A, task-specific Lambda_t, task-mixed pool of B; merges per task.",
))
