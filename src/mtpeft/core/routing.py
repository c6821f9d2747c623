"""Token routing between low-rank experts, shared by HydraLoRA, mtLoRA and token-gated MoE-LoRA.

Routing weights pi (..., G, E) are a softmax over E experts for every token and each of G groups of output
channels (fine-grained routing; G = 1 is scalar routing). Routed layers report every forward's weights
through :meth:`RoutedExpertsMixin.record_routing`: in a training forward it caches the statistics the CV^2
load-balance loss needs, and it hands the weights to the routing observers, the public hook that diagnostics
use (``handle = layer.add_routing_observer(fn)``; ``fn(layer, pi)`` on every forward until
``handle.remove()``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import ConfigError
from . import distributed
from .context import TaskContext
from .layers import AdapterLayer, Observers
from .lowrank import init_down_projection

if TYPE_CHECKING:
    from ..config import AdapterConfig

CV_EPS = 1e-10


AUTO = "auto"


def routing_groups(dim: int, group_size: int | str | None, who: str = "", num_groups: int = 2) -> int:
    """Number G of routing groups over ``dim`` output channels; 1 (scalar routing) for None or size >= dim.

    ``group_size='auto'`` gives ``num_groups`` groups at any width (mtLoRA's G = 2: the paper's 2048 of 4096),
    the last one shorter when ``num_groups`` does not divide ``dim`` (e.g. an odd width); an explicit size must
    divide ``dim``.
    """
    if group_size == AUTO:
        return max(1, min(int(num_groups), dim))
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
    padded = -(-d_out // groups) * groups  # 'auto' groups over a width they do not divide: zero rows, cut after
    if padded != d_out:
        lora_B = F.pad(lora_B, (0, 0, 0, padded - d_out))
    b = lora_B.permute(1, 0, 2).reshape(groups, padded // groups, experts * r)  # (G, d_out/G, E*r)
    return torch.einsum("...gk,gok->...go", w, b).flatten(-2)[..., :d_out]


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
    one, ``routing_group_size`` None, ``'auto'`` (then ``routing_groups`` a positive integer) or a positive
    integer."""
    config.check_positive_int("num_experts")
    if hasattr(config, "routing_group_size"):
        if config.routing_group_size == AUTO:
            config.check_positive_int("routing_groups")
        else:
            config.check("routing_group_size", not isinstance(config.routing_group_size, str),
                         "None, 'auto' or a positive integer")
            config.check_positive_int("routing_group_size", optional=True)


class RoutedExpertsMixin:
    """What the routed low-rank adapters share: reporting each forward's routing weights (cached for the
    balance loss in training, handed to the routing observers always). Layers call :meth:`init_routing`
    in their ``__init__`` and :meth:`record_routing` in their forward."""

    routed = True
    context: TaskContext
    routing_mean: torch.Tensor | None = None
    routing_count: torch.Tensor | None = None  # the (token, group) entries that mean averaged
    routing_observers: Observers

    def init_routing(self) -> None:
        """No cached statistics and no observers yet."""
        self.routing_mean = None
        self.routing_count = None
        self.routing_observers = Observers()

    def record_routing(self, pi: torch.Tensor) -> None:
        """Report this forward's routing weights pi (..., G, E): the balance loss's statistics in a training
        forward, and every routing observer's ``fn(layer, pi)``."""
        if self.context.collect:
            self.routing_mean, self.routing_count = routing_statistics(pi, self.context.token_mask)
        if self.routing_observers:
            self.routing_observers(self, pi)

    def add_routing_observer(self, fn: Callable[[Any, torch.Tensor], None]) -> RemovableHandle:
        """Call ``fn(layer, pi)`` with the routing weights of every forward until ``handle.remove()``."""
        return self.routing_observers.add(fn)

    def clear_cache(self) -> None:
        """Forget the routing statistics of the last training forward."""
        self.routing_mean = None
        self.routing_count = None


class SharedDownRoutedMixin(RoutedExpertsMixin):
    """The HydraLoRA-shaped path that HydraLoRA layers and mtLoRA blocks share: a shared down-projection
    ``lora_A`` (r x d_in), expert up-projections ``lora_B`` (E x d_out x r) and a router ``lora_router``
    (G*E x d_in) mixing them per token and per output-channel group."""

    export_kind = "routed"
    lora_A: nn.Parameter
    lora_B: nn.Parameter
    lora_router: nn.Parameter
    num_groups: int
    num_experts: int
    scale: float
    dropout: nn.Module

    def init_routed_parameters(self, d_in: int, d_out: int, config: AdapterConfig, groups: int,
                               factory_kwargs: dict[str, Any]) -> None:
        """Create A (Kaiming or Gaussian, ``config.init``), B = 0 (the model starts equal to the base) and the
        bias-free Kaiming-uniform router, for ``config.r`` and ``config.num_experts`` in ``groups`` groups."""
        r, e = config.r, config.num_experts
        self.num_experts = e
        self.num_groups = groups
        self.lora_A = nn.Parameter(torch.empty(r, d_in, **factory_kwargs))
        self.lora_B = nn.Parameter(torch.zeros(e, d_out, r, **factory_kwargs))
        self.lora_router = nn.Parameter(torch.empty(groups * e, d_in, **factory_kwargs))
        self.init_routing()
        if factory_kwargs["device"].type != "meta":  # a meta model (parameter counting) has no values to set
            init_down_projection(self.lora_A, config.init, r)
            nn.init.kaiming_uniform_(self.lora_router, a=math.sqrt(5))

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token routing weights (..., G, E); they sum to 1 over E for every token and group."""
        logits = F.linear(x.to(self.lora_router.dtype), self.lora_router)
        return grouped_softmax(logits, self.num_groups, self.num_experts)

    def routed_delta(self, x: torch.Tensor) -> torch.Tensor:
        """s * sum_e pi_e(x) * (B_e A dropout(x)), reporting the routing (balance loss, observers)."""
        pi = self.routing_weights(x)
        self.record_routing(pi)
        z = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)
        return routed_up(z, pi, self.lora_B) * self.scale


def routed_layers(model: Any) -> list[Any]:
    """The adapter layers of ``model`` that route tokens between experts (``routed`` capability)."""
    return [m for m in model.adapter_layers.values() if isinstance(m, AdapterLayer) and m.routed]


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


def balance_aux_loss(model: Any) -> dict[str, tuple[torch.Tensor, float]]:
    """``{"balance": (CV^2 balance loss of the model's routed layers, config.balance_weight)}``, or ``{}`` when
    no layer cached routing statistics in the last forward."""
    value = balance_loss(routing_means(routed_layers(model)))
    return {} if value is None else {"balance": (value, float(model.adapter_config.balance_weight))}
