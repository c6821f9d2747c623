"""mtLoRA (Tian, Ledent, Sun; ICLR 2026): block-level routed low-rank adaptation with spectral regularization.

**Block-level adaptation.** A parallel low-rank path around a whole sub-block of every transformer layer, fed
the sub-block's normalized input u and added to the sub-block's output before the residual: x' = x + F(LN(x))
+ Delta(LN(x)). ``block_type='ffn'`` (default, the paper's main setting) adapts the MLP (u = the
``post_attention_layernorm`` output = the ``mlp`` module's input), ``'attn'`` the attention (u = the
``input_layernorm`` output = ``self_attn``'s ``hidden_states``), ``'both'`` both, and ``'component'`` puts
HydraLoRA-style routed layers on the ``target_modules`` linears instead (the paper's baseline). Decoder layers
(a child ``mlp`` / ``self_attn``: LLaMA, Qwen2, Gemma, Mistral, ...) are wrapped at those modules; BERT-style
encoder layers (``attention`` / ``intermediate`` / ``output``) get the delta on the block's output dense layer
(before its dropout, residual and LayerNorm), the block input being tapped with a forward pre-hook.

**Delta.** Shared A (r x d, Kaiming), E expert up-projections B_e (d x r, zero), router W_g (E*G x d,
bias-free, Kaiming): z = A dropout(u); Pi = softmax over experts of (W_g u) reshaped (..., G, E), per token
and per group of contiguous output channels (fine-grained routing, FGR); Delta(u) = (alpha / r) * sum_e Pi_e
(expanded over each group) * (B_e z). By default (``routing_group_size='auto'``) G = ``routing_groups`` = 2 at
any width, the paper's 2048 of 4096 (576 -> 2 x 288, 896 -> 2 x 448, 3584 -> 2 x 1792); ``describe()`` reports
the resolved groups. An integer is a group size (G = d / size); None is scalar routing.

**Losses.** CV^2 balance loss (weight 0.01): mean over adapters of CV^2 of the mean routing weight per expert
(mean over batch, non-padding tokens and groups; unbiased variance, / (mean^2 + 1e-10), as the released code
except that padding is masked). Spectral-aware regularization, ``spectral_mode``:

- ``'released'`` (as the official code): for every expert B (d x r) of every adapter, G = B^T B, sigma =
  svdvals(B) detached, w = exp(-sigma / (mean sigma + 1e-8)), c = ||B||_F / sqrt(r) + 1e-8 detached, term ||(w
  w^T) * (G - c^2 I)||_F^2; mean over the B matrices (a random subset of 64 when there are more, seeded by the
  global step). Applied only at trigger steps, relative to the run: the released scripts fire about once per
  epoch (``spectral_reg_steps`` 500 of ~844 BBH steps, 280 of ~469 MMLU steps), so by default it fires
  ``spectral_firings`` = 1 time per run, at its middle (the trainer passes the run length through the
  ``TaskContext``; without one, every 500 steps). ``spectral_every=k`` is the released fixed rule ``(global_step
  + 1) % k == 0`` (``preset: released`` sets 500). It is added once per optimizer step, to the first
  micro-batch under gradient accumulation, as the released trainer; the firings are counted
  (``spectral_firings`` in the metrics' ``counters`` and ``summary.json``'s ``method_counters``).
- ``'paper'`` (the paper's stated intent): sum_{i != j} sum_k w(s_{i,k}) ||u_{i,k}^T B_j||^2 per adapter, with
  u_{i,k}, s_{i,k} the left singular vectors / values of expert B_i (detached), w(s) = exp(-s / mean s):
  low-SV directions are orthogonalized across experts, dominant shared ones left free. Every step by default.
- ``'off'``.

``spectral_weight`` defaults to 1.0 (the BBH runs; MMLU used 0.5; the released trainer's own default is 0.25).
Presets: ``paper`` = r 16, alpha 64, dropout 0.05 (the rest are the defaults); ``released`` adds
``spectral_every: 500``.

**Ablations of the paper's Table 2 by config:** HydraLoRA baseline = ``block_type='component',
target_modules=['q_proj', 'v_proj'], routing_group_size=None, spectral_mode='off'``; + Block =
``block_type='ffn', routing_group_size=None, spectral_mode='off'``; + Block + Spectral = the same with
``spectral_mode='released'``; + Block + FGR = ``spectral_mode='off'``; all three = the defaults.

No task ids; not mergeable (input routing, and the block path is parallel to a nonlinear block). The export
(``mtpeft.io.approx``) fits each block's delta onto the block's output linear (``mlp.down_proj`` /
``self_attn.o_proj``) by least squares over calibration tokens and truncates it to rank k.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..config import AdapterConfig, help_field
from ..core.context import TaskContext
from ..core.distributed import whole_tensor
from ..core.layers import Observers
from ..core.lowrank import adapter_dtype
from ..core.routing import SharedDownRoutedMixin, balance_aux_loss, check_expert_options, routed_layers, routing_groups
from ..core.spectral import UNKNOWN_RUN_PERIOD, run_relative_steps, spectral_due, spectral_paper, spectral_released
from ..core.targets import find_target_linears, layer_index, set_submodule
from ..core.wrapping import ModuleWrapper, transformer_layers
from ..errors import ConfigError, MergeError
from ..registry import MethodSpec, get_method, register_method

BLOCK_TYPES = ("ffn", "attn", "both", "component")
SPECTRAL_MODES = ("released", "paper", "off")
_FFN_OUT_NAMES = ("down_proj", "fc2", "c_proj", "w2", "dense_4h_to_h", "fc_out", "out_proj")
_ATTN_OUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo")


# --- locating the sub-blocks ----------------------------------------------------------------------------------
@dataclass
class BlockSite:
    """Where a sub-block's adapter goes.

    ``wrap_name``: the module the wrapper replaces; ``tap_name``: the module whose first input is the block
    input u when that is not the wrapped module's own input (BERT-style layers); ``out_linear``: path of the
    block's output linear relative to the wrapped module ('' = the wrapped module itself; None = there is no
    single one, which only matters for the approximate export).
    """

    layer_index: int
    layer_name: str
    kind: str
    wrap_name: str
    tap_name: str | None
    out_linear: str | None
    dim: int


def _hidden_size(model: nn.Module, fallback: int) -> int:
    cfg = getattr(model, "config", None)
    size = getattr(cfg, "hidden_size", None)
    return int(size) if isinstance(size, int) else fallback


def _find_out_linear(block: nn.Module, names: tuple[str, ...], dim: int) -> str | None:
    """The block's output projection, or None when there is no single one (then only export is affected)."""
    linears = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear) and m.out_features == dim]
    named = [n for n, _ in linears if n.rsplit(".", 1)[-1] in names]
    if len(named) == 1:
        return named[0]
    if named or not linears:  # e.g. a mixture-of-experts MLP has one down_proj per expert
        return None
    # no conventional name: the last linear back to the hidden size is the block's output projection
    return linears[-1][0]


def find_block_sites(model: nn.Module, kinds: tuple[str, ...], method: str = "mtLoRA") -> list[BlockSite]:
    """The sub-blocks of kind 'ffn' / 'attn' in every transformer layer; a clear error when there are none."""
    layers = transformer_layers(model)
    sites: list[BlockSite] = []
    for index, (lname, layer, style) in enumerate(layers):
        prefix = f"{lname}." if lname else ""
        for kind in kinds:
            if style == "decoder":
                child = "mlp" if kind == "ffn" else "self_attn"
                if not hasattr(layer, child):
                    continue
                block = getattr(layer, child)
                first = next((m for m in block.modules() if isinstance(m, nn.Linear)), None)
                dim = _hidden_size(model, first.in_features if first is not None else 0)
                out = _find_out_linear(block, _FFN_OUT_NAMES if kind == "ffn" else _ATTN_OUT_NAMES, dim)
                sites.append(BlockSite(index, lname, kind, prefix + child, None, out, dim))
            else:
                if kind == "ffn":
                    wrap, tap = f"{prefix}output.dense", f"{prefix}intermediate"
                else:
                    wrap, tap = f"{prefix}attention.output.dense", f"{prefix}attention.self"
                try:
                    dense = model.get_submodule(wrap)
                    model.get_submodule(tap)
                except AttributeError:
                    continue
                if not isinstance(dense, nn.Linear):
                    continue
                sites.append(BlockSite(index, lname, kind, wrap, tap, "", dense.out_features))
    if not sites:
        wanted = " and ".join(f"'{k}'" for k in kinds)
        raise ConfigError(
            f"{method}: {type(model).__name__} has no transformer layers with {wanted} sub-blocks that "
            f"mtpeft can find: it looks for layers with an `mlp` / `self_attn` child (LLaMA, Qwen2, Gemma, "
            f"Mistral, ...) or BERT-style `attention` / `intermediate` / `output` children"
            + ("; use block_type='component' to adapt individual linears" if method == "mtLoRA" else "")
        )
    return sites


# --- the block adapter ------------------------------------------------------------------------------------
@dataclass
class MtLoRAConfig(AdapterConfig):
    """mtLoRA: block-level routed low-rank paths, fine-grained routing, spectral-aware regularization."""

    method = "mtlora"
    block_type: str = help_field("Where to adapt: 'ffn' (around each MLP block; the paper's main setting), 'attn' "
                                 "(around each attention block), 'both', or 'component' (HydraLoRA-style routed layers "
                                 "on `target_modules`). Block modes honor `layers_to_transform` and ignore "
                                 "`target_modules`.", default="ffn")
    num_experts: int = help_field("Number E of expert up-projections B_e (paper: 16).", default=16)
    routing_group_size: int | str | None = help_field("Fine-grained routing: one softmax over experts per group of "
                                                      "output channels. 'auto' (default): `routing_groups` groups at "
                                                      "any width (the paper's 2048 of 4096 = 2 groups); an integer: "
                                                      "groups of that many channels (must divide the width); None "
                                                      "or a value >= the width: scalar routing.", default="auto")
    routing_groups: int = help_field("With routing_group_size='auto': the number G of routing groups (paper: 2; "
                                     "a last, shorter group when G does not divide the width).", default=2)
    balance_weight: float = help_field("Weight of the CV^2 balance loss on the mean routing weight per expert (paper: "
                                       "0.01; 0 = off).", default=0.01)
    spectral_mode: str = help_field("Spectral-aware regularization: 'released' (each B_e towards a scaled isometry, "
                                    "weighted by exp(-sigma/mean sigma), as the official code), 'paper' (low-SV "
                                    "directions orthogonal across experts) or 'off'.", default="released")
    spectral_weight: float = help_field("Weight of the spectral term (BBH runs: 1.0; MMLU: 0.5; the released trainer's "
                                        "default: 0.25).", default=1.0)
    spectral_every: int | None = help_field("Apply the spectral term every this many optimizer steps (when "
                                            "(global_step + 1) % k == 0; the BBH script: 500). None: 'released' "
                                            "fires `spectral_firings` times per run, relative to the trainer's run "
                                            "length (500 when no trainer tells it); 'paper' every step.",
                                            default=None)
    spectral_firings: int = help_field("'released' with spectral_every=None: how many times per run the term "
                                       "fires, evenly inside the run (1 = mid-run, as the released scripts' once "
                                       "per epoch).", default=1)
    spectral_max_matrices: int = help_field("'released' mode: at most this many B matrices per trigger (a random "
                                            "subset seeded by the step).", default=64)

    def validate(self) -> None:
        super().validate()
        self.check_choice("block_type", BLOCK_TYPES)
        self.check_choice("spectral_mode", SPECTRAL_MODES)
        check_expert_options(self)
        self.check_positive_int("spectral_every", optional=True)
        self.check_positive_int("spectral_firings")
        self.check_min("balance_weight", 0)
        self.check_min("spectral_weight", 0)
        self.check_positive_int("spectral_max_matrices")

    @property
    def spectral_period(self) -> int:
        """The effective ``spectral_every`` when the run length is unknown."""
        if self.spectral_every is not None:
            return self.spectral_every
        return UNKNOWN_RUN_PERIOD if self.spectral_mode == "released" else 1

    def spectral_fires(self, step: int, total_steps: int | None) -> bool:
        """Whether the spectral term applies at optimizer step ``step`` of a run of ``total_steps`` (None:
        unknown)."""
        every = self.spectral_every if self.spectral_every is not None or self.spectral_mode == "released" else 1
        return spectral_due(step, every, total_steps, self.spectral_firings)

    def spectral_schedule(self, total_steps: int | None) -> str:
        """The spectral schedule in words (for ``describe``)."""
        if self.spectral_mode == "off" or self.spectral_weight == 0:
            return "off"
        if self.spectral_every is None and self.spectral_mode == "released" and total_steps:
            steps = run_relative_steps(total_steps, self.spectral_firings)
            return f"at steps {steps} of {total_steps}"
        return f"every {self.spectral_period} steps"

    #: ``preset: paper``: the paper's r, alpha, dropout (G = 2, 16 experts, lambda 1.0, balance 0.01 are defaults)
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {"r": 16, "alpha": 64, "dropout": 0.05},
        "released": {"r": 16, "alpha": 64, "dropout": 0.05, "spectral_every": 500},
    }


class BlockAdapter(SharedDownRoutedMixin, ModuleWrapper):
    """Wraps a sub-block (or, in BERT-style layers, the block's output dense) and adds the routed delta.

    Parameters: ``lora_A`` (r x d), ``lora_B`` (E x d x r, zero at init), ``lora_router`` (G*E x d). Delta
    observers (``add_delta_observer``) see every forward's block input u and delta (the approximate export
    fits its update from them).
    """

    export_kind = "block"

    def __init__(self, base_layer: nn.Module, config: MtLoRAConfig, context: TaskContext, site: BlockSite,
                 tap: nn.Module | None = None) -> None:
        super().__init__(base_layer)
        weight = next(base_layer.parameters())
        self.context = context
        self.kind = site.kind
        self.module_name = site.wrap_name
        self.out_linear_path = site.out_linear
        self.out_linear_name = f"{site.wrap_name}.{site.out_linear}" if site.out_linear else site.wrap_name
        if site.out_linear is None:
            self.out_linear_name = None
        self.dim = site.dim
        self.scale = config.scale
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        groups = routing_groups(site.dim, config.routing_group_size, f" of block {site.wrap_name!r}",
                                config.routing_groups)
        kw = {"device": weight.device, "dtype": adapter_dtype(weight)}
        self.init_routed_parameters(site.dim, site.dim, config, groups, kw)
        self.delta_observers = Observers()
        self._tapped: torch.Tensor | None = None
        self.uses_tap = tap is not None
        if tap is not None:
            # the block input is another module's input: record it when that module runs (also on
            # activation-checkpointing recomputation, which re-runs the same modules in the same order)
            tap.register_forward_pre_hook(self._tap)

    def add_delta_observer(self, fn: Callable[[BlockAdapter, torch.Tensor, torch.Tensor], None]) -> RemovableHandle:
        """Call ``fn(layer, u, delta)`` with the block input and the adapter's delta of every forward until
        ``handle.remove()``."""
        return self.delta_observers.add(fn)

    def _tap(self, module: nn.Module, args: tuple) -> None:
        self._tapped = args[0] if args else None

    def output_linear(self) -> nn.Linear:
        """The block's output linear (where an approximate export puts the fitted update)."""
        if self.out_linear_path is None:
            raise MergeError(f"mtLoRA block {self.module_name!r} has no single output linear layer (none, or "
                             f"several as in a mixture-of-experts MLP) to fit an approximate LoRA onto")
        if not self.out_linear_path:
            return self.base_layer
        return self.base_layer.get_submodule(self.out_linear_path)

    def block_delta(self, u: torch.Tensor) -> torch.Tensor:
        """Delta(u) = s * sum_e Pi_e * (B_e A dropout(u)), (..., d)."""
        return self.routed_delta(u)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped block's output plus Delta(u) (added to element 0 when the block returns a tuple)."""
        out = self.base_layer(*args, **kwargs)
        if self.uses_tap:
            u, self._tapped = self._tapped, None
            if u is None:
                raise RuntimeError(f"mtLoRA block {self.module_name!r}: the block input was not recorded "
                                   f"(the tapped module did not run before the block's output layer)")
        else:
            u = self.first_input(args, kwargs)
        delta = self.block_delta(u)
        if self.delta_observers:
            self.delta_observers(self, u, delta)
        return self.add_to_output(out, delta)

    def expert_matrices(self) -> list[torch.Tensor]:
        """The experts' up-projections B_e (d x r), for the spectral regularizer."""
        return list(whole_tensor(self.lora_B).unbind(0))

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, dim={self.dim}, rank={self.lora_A.shape[0]}, experts={self.num_experts}, "
                f"groups={self.num_groups}, scale={self.scale:g}")


def inject(model: nn.Module, config: MtLoRAConfig, context: TaskContext) -> dict[str, nn.Module]:
    """Wrap the chosen sub-blocks (or the target linears for 'component') of ``model`` in place."""
    layers: dict[str, nn.Module] = {}
    if config.block_type == "component":
        hydralora = get_method("hydralora")  # the paper's baseline: HydraLoRA's own layer, by name
        for name in find_target_linears(model, config):
            layer = hydralora.create_layer(model.get_submodule(name), config, context, name)
            set_submodule(model, name, layer)
            layers[name] = layer
        return layers
    kinds = ("ffn", "attn") if config.block_type == "both" else (config.block_type,)
    sites = find_block_sites(model, kinds)
    if config.layers_to_transform is not None:
        wanted = {int(i) for i in config.layers_to_transform}
        sites = [s for s in sites if _layer_of(s) in wanted]
        if not sites:
            raise ConfigError(f"MtLoRAConfig.layers_to_transform {sorted(wanted)} selects no layer; the "
                              f"model's layer indices are 0..{len(transformer_layers(model)) - 1}")
    for site in sites:
        tap = model.get_submodule(site.tap_name) if site.tap_name else None
        wrapper = BlockAdapter(model.get_submodule(site.wrap_name), config, context, site, tap)
        set_submodule(model, site.wrap_name, wrapper)
        layers[site.wrap_name] = wrapper
    return layers


def _layer_of(site: BlockSite) -> int:
    """The layer index as ``layers_to_transform`` counts it (the index in the module name, as PEFT)."""
    index = layer_index(site.wrap_name)
    return site.layer_index if index is None else index


def spectral_loss(model) -> torch.Tensor | None:
    """The configured spectral regularizer over all adapters (ignores the trigger schedule)."""
    cfg: MtLoRAConfig = model.adapter_config
    layers = routed_layers(model)
    if cfg.spectral_mode == "released":
        mats = [b for layer in layers for b in layer.expert_matrices()]
        return spectral_released(mats, model.context.global_step, cfg.spectral_max_matrices)
    if cfg.spectral_mode == "paper":
        return spectral_paper([whole_tensor(layer.lora_B) for layer in layers])
    return None


def aux_losses(model) -> dict[str, tuple[torch.Tensor, float]]:
    """Balance loss (every step) and the spectral term (at trigger steps, on the first micro-batch of the
    optimizer step only, as the released trainer; 0 otherwise). Firings count as ``spectral_firings``."""
    cfg: MtLoRAConfig = model.adapter_config
    ctx = model.context
    out = balance_aux_loss(model)
    if cfg.spectral_mode != "off":
        spec = None
        if cfg.spectral_weight > 0 and ctx.micro_step == 0 and cfg.spectral_fires(ctx.global_step, ctx.total_steps):
            spec = spectral_loss(model)
            if spec is not None:
                ctx.count("spectral_firings")
        if spec is None:
            spec = torch.zeros((), device=model.device)
        out["spectral"] = (spec, float(cfg.spectral_weight))
    return out


def describe(model) -> str:
    """One line about where the adapters are and how they route."""
    cfg: MtLoRAConfig = model.adapter_config
    layers = routed_layers(model)
    groups = sorted({(m.num_groups, -(-m.lora_B.shape[1] // m.num_groups)) for m in layers})
    routing = ", ".join(f"{g} x {size} channels" for g, size in groups)
    fired = model.context.counters.get("spectral_firings", 0)
    return (f"mtLoRA: block_type={cfg.block_type}, {len(layers)} adapters, {cfg.num_experts} experts, "
            f"rank {cfg.r}, routing groups {routing} (routing_group_size={cfg.routing_group_size!r}), "
            f"spectral={cfg.spectral_mode} (weight {cfg.spectral_weight:g}, "
            f"{cfg.spectral_schedule(model.context.total_steps)}, fired {fired}x), "
            f"balance weight {cfg.balance_weight:g}")


register_method(MethodSpec(
    name="mtlora", config_class=MtLoRAConfig, inject=inject, aux_losses=aux_losses, describe=describe,
    merge="none",
    description="Block-level routed low-rank paths (shared A, expert B_e, fine-grained router) with spectral "
                "regularization; approximate export only.",
))
