"""MoE-LoRA: the rank split into E low-rank experts (A_e, B_e) mixed by a gate; task-gated or token-gated.

``gating='task'`` is MOELoRA (Liu et al. 2023): h = W0 x + s * sum_e g_e(t) B_e A_e dropout(x) with
g(t) = softmax(W_g Emb(t)). Every adapted linear has its own task embedding (T+1 rows of dimension
``task_embedding_dim`` = 64; row T is the "unknown task", used when no task id is given, as in the released
code) and its own bias-free gate W_g (E x 64). The gate depends only on the task, so the update is a fixed
matrix per task and the model merges once per task: ``lora_factors(t)`` is exactly ([A_e] stacked,
[g_e(t) s B_e] side by side).

``gating='token'`` is the MoLE-style token-routed variant: g(x) = softmax(W_g x) per token, only the
``top_k`` largest weights kept (renormalized to sum to 1 by default), plus the CV^2 load-balance loss on the
mean gate per expert (weight ``balance_weight``, 0.01). No task ids; not mergeable (input-routed): the export
is the expected update sum_e E[g_e] s B_e A_e truncated to rank k (``mtpeft.io.approx``).

One method name covers both: the merge class follows the config through ``MethodSpec.merge_for``
('per_task' for task gating, 'none' for token gating), so a single config class keeps save/load and the
config dictionaries uniform.

The rank r is split into E experts of rank r/E; when E does not divide r the ranks differ by at most one
(larger first). The experts are stored concatenated (``lora_A`` r x d_in, ``lora_B`` d_out x r) with the
buffer ``expert_of_rank`` naming each rank row's expert, so one matmul serves all experts.

``init='moelora'`` draws every expert's down-projection from N(0, 0.01) (std 0.01), as both official MOELoRA
copies (the mtLoRA and MTL-LoRA repositories) do; the default stays PEFT's Kaiming-uniform. ``preset:
released`` = that init, 8 experts and q/k/v/o (the MTL-LoRA script).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, help_field
from ..core.context import TaskContext, per_sample
from ..core.layers import LinearAdapter
from ..core.lowrank import add_update, init_down_projection
from ..core.routing import RoutedExpertsMixin, balance_aux_loss, check_expert_options
from ..errors import ConfigError, MergeError
from ..registry import MethodSpec, register_method

GATINGS = ("task", "token")


@dataclass
class MoELoRAConfig(AdapterConfig):
    """MoE-LoRA: rank-split LoRA experts gated per task (MOELoRA, merges per task) or per token (top-k)."""

    method = "moe_lora"
    init_choices = ("kaiming", "gaussian", "moelora")  # moelora: A ~ N(0, 0.01), as both official copies
    #: ``preset: released``: the MTL-LoRA repository's MOELoRA script (8 experts, q/k/v/o, its N(0, 0.01) init)
    presets = {"released": {"init": "moelora", "num_experts": 8,
                            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}}
    gating: str = help_field("'task': gate softmax(W_g Emb(task)) per sample (MOELoRA; merges per task); 'token': gate "
                             "softmax(W_g x) per token with top-k (MoLE-style; not mergeable).", default="task")
    num_experts: int = help_field("Number E of experts; the rank r is split among them (r/E each; the released MOELoRA "
                                  "scripts use 8 with r = 8 or 16). Must be <= r.", default=4)
    task_embedding_dim: int = help_field("Dimension of the task embedding that feeds the task gate (gating='task').",
                                         default=64)
    top_k: int = help_field("Experts kept per token (gating='token'); >= num_experts keeps all (dense softmax gate).",
                            default=2)
    renormalize_top_k: bool = help_field("Renormalize the kept top-k weights to sum to 1 per token (gating='token').",
                                         default=True)
    balance_weight: float = help_field("Weight of the CV^2 load-balance loss on the mean gate per expert "
                                       "(gating='token' only).", default=0.01)

    def validate(self) -> None:
        super().validate()
        self.check_choice("gating", GATINGS)
        check_expert_options(self)
        if self.num_experts > self.r:
            raise ConfigError(f"{type(self).__name__}.num_experts ({self.num_experts}) must be <= r ({self.r}): "
                              f"every expert needs rank >= 1")
        self.check_positive_int("task_embedding_dim")
        self.check_positive_int("top_k")
        self.check_min("balance_weight", 0)

    def requires_tasks(self) -> bool:
        return self.gating == "task"

    def expert_ranks(self) -> list[int]:
        """Rank of each expert: r split as evenly as possible, larger first."""
        base, extra = divmod(self.r, self.num_experts)
        return [base + (1 if e < extra else 0) for e in range(self.num_experts)]


class MoELoRALinear(RoutedExpertsMixin, LinearAdapter):
    """A linear with rank-split LoRA experts. Parameters: ``lora_A`` (r x d_in), ``lora_B`` (d_out x r, zero);
    task gating: ``lora_task_embedding`` (T+1 x te_dim), ``lora_gate`` (E x te_dim); token gating:
    ``lora_router`` (E x d_in)."""

    def __init__(self, base_layer: nn.Linear, config: MoELoRAConfig, context: TaskContext,
                 name: str = "") -> None:
        super().__init__(base_layer, config, context, name)
        kw = self.factory_kwargs
        r, e = config.r, config.num_experts
        self.gating = config.gating
        # capabilities: a task gate is a fixed update per task; a token gate routes (approximate export only)
        self.task_gated = self.gating == "task"
        self.routed = not self.task_gated
        self.export_kind = "exact" if self.task_gated else "routed"
        self.num_experts = e
        self.num_groups = 1
        self.num_tasks = len(config.tasks)
        self.top_k = min(config.top_k, e)
        self.renormalize = config.renormalize_top_k
        self.init_routing()
        ranks = config.expert_ranks()
        # built on the CPU and moved: repeat_interleave has a data-dependent size, which a meta tensor lacks
        rank_owner = torch.repeat_interleave(torch.arange(e), torch.tensor(ranks)).to(kw["device"])
        self.register_buffer("expert_of_rank", rank_owner, persistent=False)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        if self.gating == "task":
            te_dim = config.task_embedding_dim
            self.lora_task_embedding = nn.Parameter(torch.empty(self.num_tasks + 1, te_dim, **kw))
            self.lora_gate = nn.Parameter(torch.empty(e, config.task_embedding_dim, **kw))
        else:
            self.lora_router = nn.Parameter(torch.empty(e, self.in_features, **kw))
        if kw["device"].type != "meta":  # a meta model (parameter counting) has no values to initialize
            if config.init == "moelora":  # the official MOELoRA copies: every expert's A ~ N(0, std 0.01)
                nn.init.normal_(self.lora_A, mean=0.0, std=0.01)
            else:
                init_down_projection(self.lora_A, config.init, r)
            if self.gating == "task":
                nn.init.normal_(self.lora_task_embedding)  # nn.Embedding's default, as the released code
                nn.init.kaiming_uniform_(self.lora_gate, a=math.sqrt(5))  # nn.Linear's default
            else:
                nn.init.kaiming_uniform_(self.lora_router, a=math.sqrt(5))

    # --- gates -------------------------------------------------------------------------------------------
    def task_gate(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Gate weights (..., E) for task ids (...); id T is the unknown task."""
        emb = self.lora_task_embedding[task_ids]
        return torch.softmax(F.linear(emb, self.lora_gate), dim=-1)

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Token gating: per-token weights (..., 1, E) after top-k (they sum to 1 when renormalized)."""
        probs = torch.softmax(F.linear(x.to(self.lora_router.dtype), self.lora_router), dim=-1)
        if self.top_k < self.num_experts:
            top, idx = probs.topk(self.top_k, dim=-1)
            if self.renormalize:
                top = top / top.sum(-1, keepdim=True)
            probs = torch.zeros_like(probs).scatter(-1, idx, top)
        return probs[..., None, :]

    def _sample_ids(self, x: torch.Tensor) -> torch.Tensor:
        """The task ids of the rows of ``x`` (per sample or per token); the unknown task without ids."""
        if self.context.task_ids is None:
            if self.training:
                raise ValueError(f"MoE-LoRA ({self.module_name}) with gating='task' needs task_ids in "
                                 f"training (the unknown-task gate is only for inference without ids)")
            return torch.full((x.shape[0],), self.num_tasks, dtype=torch.long, device=x.device)
        return self.context.task_ids_for(f"MoE-LoRA ({self.module_name})", x).to(x.device)

    # --- forward -----------------------------------------------------------------------------------------
    def gated_down(self, x: torch.Tensor) -> torch.Tensor:
        """A dropout(x) with each expert's rank rows scaled by its gate weight, (..., r)."""
        z = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)  # (..., r)
        if self.gating == "task":
            ids = self._sample_ids(x)
            gate = self.task_gate(ids)[..., self.expert_of_rank]  # (b, r), or (b, seq, r) for per-token ids
            return z * per_sample(gate, z, ids)
        pi = self.routing_weights(x)
        self.record_routing(pi)
        return z * pi[..., 0, :][..., self.expert_of_rank].to(z.dtype)

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.gated_down(x), self.lora_B) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """W0 x + s B (gated z), added into the base output by one addmm (LoRA's fast path) over an fp32 base;
        over a half-precision base the update is computed in fp32 and cast, as ``adapter_output``."""
        out = self.base_layer(x)
        return out if self.merged else add_update(out, self.gated_down(x), self.lora_B, self.scale)

    def lora_factors(self, task: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.gating != "task":
            raise MergeError(f"{self.module_name or 'this layer'}: token-gated MoE-LoRA routes each token "
                             f"from its input, so it has no fixed LoRA factors; use "
                             f"mtpeft.io.approx.approximate_factors")
        tid = self.num_tasks if task is None else int(task)
        ids = torch.tensor([tid], device=self.lora_A.device)
        gate = self.task_gate(ids)[0][self.expert_of_rank]  # (r,)
        return self.lora_A, self.lora_B * gate[None, :] * self.scale

    def expected_delta_weight(self, mean_pi: torch.Tensor) -> torch.Tensor:
        """Token gating: the update for fixed gate weights ``mean_pi`` (1, E): sum_e pi_e s B_e A_e."""
        w = mean_pi.reshape(-1).to(self.lora_B.dtype)[self.expert_of_rank]
        return (self.lora_B * w[None, :] * self.scale) @ self.lora_A

    def expert_matrices(self) -> list[torch.Tensor]:
        """Each expert's B_e (d_out x r_e)."""
        return [self.lora_B[:, self.expert_of_rank == e] for e in range(self.num_experts)]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, experts={self.num_experts}, gating={self.gating}"


def create_layer(base_layer: nn.Linear, config: MoELoRAConfig, context: TaskContext,
                 name: str) -> MoELoRALinear:
    """Wrap one linear with a MoE-LoRA layer."""
    return MoELoRALinear(base_layer, config, context, name)


def merge_for(config: MoELoRAConfig) -> str:
    """Task gating merges per task; token gating is input-routed and does not merge."""
    return "per_task" if config.gating == "task" else "none"


def aux_losses(model) -> dict[str, tuple[torch.Tensor, float]]:
    """Token gating: the CV^2 load-balance loss; task gating has no auxiliary loss."""
    return balance_aux_loss(model) if model.adapter_config.gating == "token" else {}


def describe(model) -> str:
    """One line about the experts and the gate."""
    cfg: MoELoRAConfig = model.adapter_config
    gate = (f"task gate (embedding dim {cfg.task_embedding_dim}, unknown-task row {len(cfg.tasks)})"
            if cfg.gating == "task" else f"token gate, top-{cfg.top_k}")
    return f"MoE-LoRA: {cfg.num_experts} experts of ranks {cfg.expert_ranks()}, {gate}"


register_method(MethodSpec(
    name="moe_lora", config_class=MoELoRAConfig, create_layer=create_layer, aux_losses=aux_losses,
    describe=describe, merge="per_task", merge_for=merge_for,
    description="Rank-split LoRA experts; task gate (MOELoRA, merges per task) or token top-k gate (no "
                "merge).",
))
