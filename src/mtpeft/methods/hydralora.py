"""HydraLoRA (Tian et al., NeurIPS 2024): shared down-projection A, N up-projection heads B_i, a token router.

h = W0 x + s * sum_i pi_i(x) B_i A dropout(x), with pi(x) = softmax(W_r x) per token, W_r a bias-free linear
(Kaiming-uniform), A Kaiming-uniform and every B_i zero, so the adapted model starts equal to the base.

Options beyond the original:

- ``routing_group_size``: fine-grained routing (FGR, from mtLoRA): the router gives one softmax over the heads
  for every contiguous group of ``routing_group_size`` output channels (G = out_features / group_size groups,
  router output index g*N + i). ``None`` or a size >= out_features is scalar routing (the original).
- ``balance_weight``: the CV^2 load-balance loss (off by default, as the original returns a zero balance loss;
  mtLoRA's HydraLoRA baseline uses 0.01). CV^2 = var / mean^2 of the mean routing weight per head, the mean
  taken over batch, tokens (padding masked) and groups; ``var`` is the unbiased variance (torch's default, as
  the released mtLoRA code), plus 1e-10 in the denominator.

No task ids. Routing depends on the input, so the model cannot be merged; ``export_peft(rank=k,
calibration=...)`` exports the expected update sum_i E[pi_i] B_i A truncated to rank k (``mtpeft.io.approx``).

This module also holds the routing pieces that mtLoRA and token-gated MoE-LoRA reuse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, ConfigError, MethodSpec, register_method
from ..core import distributed
from ..core.layers import LinearAdapter, TaskContext, init_down_projection
from ..model import MergeError
from .lora import add_low_rank

CV_EPS = 1e-10


# --- shared routing utilities -----------------------------------------------------------------------------
def routing_groups(dim: int, group_size: int | None, who: str = "") -> int:
    """Number G of routing groups over ``dim`` output channels; 1 (scalar routing) for None or size >= dim."""
    if group_size is None or group_size >= dim:
        return 1
    if group_size <= 0 or dim % group_size:
        raise ConfigError(f"routing_group_size={group_size} must divide the output dimension {dim}{who} "
                          f"(allowed: a divisor of {dim}, or None / a value >= {dim} for scalar routing)")
    return dim // group_size


def grouped_softmax(logits: torch.Tensor, groups: int, experts: int) -> torch.Tensor:
    """Router logits (..., G*E) -> routing weights (..., G, E), a softmax over experts in each group."""
    logits = logits.reshape(*logits.shape[:-1], groups, experts)
    # softmax in at least fp32 (a bf16 softmax makes the weights visibly miss summing to 1)
    return torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def routed_up(z: torch.Tensor, pi: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """sum_e pi_e (per group) * (B_e z) without materializing the E expert outputs.

    z (..., r), pi (..., G, E), lora_B (E, d_out, r) -> (..., d_out). Within group g the output is
    B^(g) (pi_g kron z) where B^(g) (d_out/G, E*r) stacks the experts' rows of that group side by side, so the
    cost is one (E*r)-wide matmul per group instead of E full up-projections.
    """
    experts, d_out, r = lora_B.shape
    groups = pi.shape[-2]
    w = (pi.to(z.dtype)[..., None] * z[..., None, None, :]).flatten(-2)  # (..., G, E*r)
    b = lora_B.permute(1, 0, 2).reshape(groups, d_out // groups, experts * r)  # (G, d_out/G, E*r)
    return torch.einsum("...gk,gok->...go", w, b).flatten(-2)


def routing_statistics(pi: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean routing weight per expert (E,) over batch, tokens and groups, padding (mask == 0) left out, and the
    number of (token, group) entries it averages (a scalar: the weight of this mean across processes)."""
    experts = pi.shape[-1]
    if mask is not None and tuple(mask.shape) == tuple(pi.shape[:-2]):
        w = mask.to(pi.dtype)[..., None, None].expand_as(pi)
        count = w.reshape(-1, experts).sum(0)  # the same for every expert
        return (pi * w).reshape(-1, experts).sum(0) / count.clamp_min(1), count[0]
    flat = pi.reshape(-1, experts)
    return flat.mean(0), torch.tensor(flat.shape[0])



def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation var(x) / (mean(x)^2 + 1e-10), unbiased variance; 0 for one element."""
    if x.numel() <= 1:
        return torch.zeros((), device=x.device, dtype=torch.float32)
    x = x.float()
    return x.var() / (x.mean() ** 2 + CV_EPS)


def check_expert_options(config: AdapterConfig) -> None:
    """The routed methods' shared option checks: ``num_experts`` a positive integer and, where the config has
    one, ``routing_group_size`` None or a positive integer."""
    name = type(config).__name__
    if not isinstance(config.num_experts, int) or config.num_experts < 1:
        raise ConfigError(f"{name}.num_experts must be a positive integer, got {config.num_experts!r}")
    size = getattr(config, "routing_group_size", None)
    if size is not None and (not isinstance(size, int) or size < 1):
        raise ConfigError(f"{name}.routing_group_size must be None or a positive integer, got {size!r}")


def routing_means(layers: list[RoutedExpertsMixin]) -> list[torch.Tensor]:
    """Each routed layer's mean routing weight per expert over the last training forward's batch; under data
    parallelism over the global batch (token-weighted across processes, one collective for all layers)."""
    cached = [m for m in layers if m.routing_mean is not None]
    if not cached or not distributed.is_distributed():
        return [m.routing_mean for m in cached]
    means = torch.stack([m.routing_mean for m in cached])  # (L, E)
    counts = torch.stack([torch.as_tensor(m.routing_count, dtype=means.dtype, device=means.device)
                          for m in cached])
    totals = distributed.all_reduce_sum(torch.cat([means * counts[:, None], counts[:, None]], 1))
    return list((totals[:, :-1] / totals[:, -1:].clamp_min(1)).unbind(0))


def balance_loss(means: list[torch.Tensor]) -> torch.Tensor | None:
    """Mean over adapters of CV^2 of each adapter's mean routing weight per expert (None if none cached)."""
    if not means:
        return None
    if len({tuple(m.shape) for m in means}) == 1 and means[0].dim() == 1 and means[0].numel() > 1:
        # all adapters at once (cv_squared row by row): a few ops in all instead of a few per adapter, both ways
        x = torch.stack(means).float()
        return (x.var(1) / (x.mean(1) ** 2 + CV_EPS)).mean()
    return torch.stack([cv_squared(m) for m in means]).mean()


def spectral_released(matrices: list[torch.Tensor], step: int = 0,
                      max_matrices: int = 64) -> torch.Tensor | None:
    """The spectral regularizer as in the released mtLoRA code, mean over the expert matrices B (d x r).

    For each B: G = B^T B (with gradient), sigma = singular values of B (detached, fp32), w = exp(-sigma /
    (mean sigma + 1e-8)), c = ||B||_F / sqrt(r) + 1e-8 (detached); term = ||(w w^T) * (G - c^2 I)||_F^2 (w
    indexes singular values but weights Gram columns, the released code's heuristic pairing). With more than
    ``max_matrices`` matrices a random subset of that size is used, drawn from a generator seeded by
    ``step``.
    """
    if not matrices:
        return None
    if len(matrices) > max_matrices:
        gen = torch.Generator().manual_seed(int(step))
        idx = torch.randperm(len(matrices), generator=gen)[:max_matrices].tolist()
        matrices = [matrices[i] for i in sorted(idx)]
    terms = []
    for b in matrices:
        r = b.shape[1]
        gram = b.t() @ b
        with torch.no_grad():
            sigma = torch.linalg.svdvals(b.detach().float())
            w = torch.exp(-sigma / (sigma.mean() + 1e-8)).to(b.dtype)
            c = torch.linalg.norm(b.detach()) / math.sqrt(r) + 1e-8
        eye = torch.eye(r, device=b.device, dtype=b.dtype) * c**2
        terms.append((((gram - eye) * w[None, :] * w[:, None]) ** 2).sum())
    return torch.stack(terms).mean()


def spectral_paper(expert_sets: list[torch.Tensor]) -> torch.Tensor | None:
    """Paper-intent spectral regularizer: orthogonalize the low-singular-value directions across experts.

    For each adapter with experts B_1..B_E (E, d, r): B_i = U_i S_i V_i^T, w_{i,k} = exp(-s_{i,k} / mean_k
    s_{i,k}) (SVD detached: weights and directions are constants of the step) and the term is
    sum_{i != j} sum_k w_{i,k} ||u_{i,k}^T B_j||^2: B_j is pushed out of expert i's weak (low-SV, heavily
    weighted) directions while its dominant, shared ones (small weight) stay free. Mean over adapters.
    """
    values = []
    for bs in expert_sets:
        experts = bs.shape[0]
        if experts < 2:
            continue
        with torch.no_grad():
            u, s, _ = torch.linalg.svd(bs.detach().float(), full_matrices=False)  # (E, d, r), (E, r)
            w = torch.exp(-s / (s.mean(-1, keepdim=True) + 1e-8))
        proj = torch.einsum("idk,jdr->ijkr", u.to(bs.dtype), bs)  # u_{i,k}^T B_j: (E, E, r, r)
        energy = (proj**2).sum(-1)  # (E_i, E_j, r)
        off = ~torch.eye(experts, dtype=torch.bool, device=bs.device)
        values.append((energy * w.to(bs.dtype)[:, None, :])[off].sum())
    if not values:
        return None
    return torch.stack(values).mean()


class RoutedExpertsMixin:
    """What the routed low-rank adapters share: caching the routing statistics for the balance loss."""

    context: TaskContext
    routing_mean: torch.Tensor | None
    routing_count: torch.Tensor | None = None  # the (token, group) entries that mean averaged

    def _cache_routing(self, pi: torch.Tensor) -> None:
        if self.context.collect:
            self.routing_mean, self.routing_count = routing_statistics(pi, self.context.token_mask)

    def clear_cache(self) -> None:
        """Forget the routing statistics of the last training forward."""
        self.routing_mean = None
        self.routing_count = None


class SharedDownRoutedMixin(RoutedExpertsMixin):
    """The HydraLoRA-shaped path that HydraLoRA layers and mtLoRA blocks share: a shared down-projection
    ``lora_A`` (r x d_in), expert up-projections ``lora_B`` (E x d_out x r) and a router ``lora_router``
    (G*E x d_in) mixing them per token and per output-channel group."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    lora_router: nn.Parameter
    num_groups: int
    num_experts: int
    scale: float
    dropout: nn.Module

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token routing weights (..., G, E); they sum to 1 over E for every token and group."""
        logits = F.linear(x.to(self.lora_router.dtype), self.lora_router)
        return grouped_softmax(logits, self.num_groups, self.num_experts)

    def routed_delta(self, x: torch.Tensor) -> torch.Tensor:
        """s * sum_e pi_e(x) * (B_e A dropout(x)), caching the routing for the balance loss."""
        pi = self.routing_weights(x)
        self._cache_routing(pi)
        z = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)
        return routed_up(z, pi, self.lora_B) * self.scale


# --- HydraLoRA ----------------------------------------------------------------------------------------------
@dataclass
class HydraLoRAConfig(AdapterConfig):
    """HydraLoRA: shared A, N up-projection heads, per-token router; input-routed, not mergeable."""

    method = "hydralora"
    num_experts: int = field(default=4, metadata={
        "help": "Number N of up-projection heads B_i (HydraLoRA's script: 4; mtLoRA's baseline: 16)."})
    routing_group_size: int | None = field(default=None, metadata={
        "help": "Fine-grained routing: one softmax over heads per group of this many output channels. None "
                "(or a value >= out_features) is scalar routing as the original; otherwise it must divide "
                "out_features of every target module."})
    balance_weight: float = field(default=0.0, metadata={
        "help": "Weight of the CV^2 load-balance loss (0 = off, as the original; mtLoRA's baseline: 0.01)."})

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        check_expert_options(self)
        if not self.balance_weight >= 0:
            raise ConfigError(f"{name}.balance_weight must be >= 0, got {self.balance_weight!r}")


class HydraLoRALinear(SharedDownRoutedMixin, LinearAdapter):
    """A linear with HydraLoRA. Parameters: ``lora_A`` (r x d_in), ``lora_B`` (E x d_out x r, zero at init),
    ``lora_router`` (G*E x d_in, bias-free, Kaiming-uniform)."""

    def __init__(self, base_layer: nn.Linear, config: HydraLoRAConfig, context: TaskContext,
                 name: str = "") -> None:
        super().__init__(base_layer, config, context, name)
        kw = self.factory_kwargs
        r, e = config.r, config.num_experts
        self.num_experts = e
        self.num_groups = routing_groups(self.out_features, config.routing_group_size,
                                         f" of module {name!r}" if name else "")
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(e, self.out_features, r, **kw))
        self.lora_router = nn.Parameter(torch.empty(self.num_groups * e, self.in_features, **kw))
        self.routing_mean = None
        if kw["device"].type != "meta":  # a meta model (parameter counting) has no values to initialize
            init_down_projection(self.lora_A, config.init, r)
            nn.init.kaiming_uniform_(self.lora_router, a=math.sqrt(5))

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
        self._cache_routing(pi)
        w = (pi[..., 0, :, None].to(z.dtype) * z[..., None, :]).flatten(-2)  # (..., E*r), expert-major
        up_t = self.lora_B.permute(0, 2, 1).reshape(-1, self.out_features)  # row e*r + j: column j of B_e
        return add_low_rank(out, w, up_t, self.scale)

    def expert_matrices(self) -> list[torch.Tensor]:
        """The experts' up-projections B_e (d_out x r), for the spectral regularizer."""
        return list(self.lora_B.unbind(0))

    def expected_delta_weight(self, mean_pi: torch.Tensor) -> torch.Tensor:
        """The update for fixed routing weights ``mean_pi`` (G, E): group g's rows get sum_e pi_ge s B_e A."""
        rows = mean_pi.to(self.lora_B.dtype).repeat_interleave(self.out_features // self.num_groups, dim=0)
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


def routed_layers(model) -> list:
    """The adapter layers of ``model`` that cache routing statistics."""
    return [m for m in model.adapter_layers.values() if isinstance(m, RoutedExpertsMixin)]


def aux_losses(model) -> dict[str, tuple[torch.Tensor, float]]:
    """The CV^2 balance loss (reported always, weighted by ``balance_weight``)."""
    value = balance_loss(routing_means(routed_layers(model)))
    if value is None:
        return {}
    return {"balance": (value, float(model.adapter_config.balance_weight))}


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
