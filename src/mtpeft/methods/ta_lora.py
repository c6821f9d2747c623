"""TA-LoRA (Zhang et al., ICME 2025): task-adaptive low-rank deep prompts, fast/slow weights (reconstructed).

Only the abstract-level description of TA-LoRA was available (no paper body, no code), so this module
implements the reading in ``docs/methods.md`` section 4.2 and makes each uncertain choice explicit:

- **Prompt.** At each chosen layer l, task t's prompt is P_t = P_0 + s * B A_t (l_p x d): P_0 (shared, l_p x
  d), the slow weight B (l_p x r, shared across tasks) and the fast weight A_t (r x d, one per task); s =
  alpha / r as in LoRA (set alpha = r for no scaling). Init: P_0 ~ N(0, ``prompt_init_std``^2) (the prompt
  tokens live in the normalized hidden space the attention reads), B Kaiming-uniform (``init``), A_t = 0, so
  every task starts from the shared prompt P_0 and the low-rank part grows from zero.
- **Layers.** ``prompt_layers`` (1-based); default: at one half, three quarters and the end of the depth,
  ceil(L/2), ceil(3L/4), L -- for a 28-layer model 14, 21 and 28 (the layers the seed summary names).
- **Zero-initialized gated attention** (LLaMA-Adapter style). The chosen layers' attention module is wrapped;
  from the hidden states it receives (the ``input_layernorm`` output) it computes queries with the module's
  own q_proj, keys / values of the prompt with its own k_proj / v_proj (biases included, grouped-query heads
  repeated; ``q_norm`` / ``k_norm`` applied when the module has them), a softmax over the prompt keys only
  (separate from the sequence's softmax), gates each head with tanh(g_h) (g = 0 at init, so the model starts
  exactly equal to the base) and maps the result through o_proj's weight (no bias: the base attention already
  adds it). No rotary embedding on the prompt: prompt keys are position-free and the prompt query uses the
  un-rotated q. The prompt part is recomputed on every call from the current queries, so it works unchanged
  with the KV cache in ``generate``. BERT-style layers wrap ``attention.self`` (whose output dense follows).
- **Fast / slow learning rates.** ``param_groups(model, lr, weight_decay, slow_lr_scale=...)``: the fast
  weights A_t (and the gates) train at lr * ``prompt_lr_scale``, the slow B and P_0 at that times
  ``slow_lr_scale`` (0.1). ``prompt_lr_scale`` (5) exists because prompt tuning wants larger steps than a
  weight-space LoRA, and a run config usually has one lr for every method. Measured with ``mtpeft demo
  --method ta_lora`` (80 steps, CPU, lr 2e-3): macro 36.2% with a scale of 1 and 71.2% with 5. MTL-LoRA
  reaches 88.8% there.
- **New tasks** (the paper's few-shot target adaptation). ``model.add_task(name, init='mean' | 'zeros' |
  'random' | <existing task>, train_only_new=False)`` appends a fast weight per layer; with ``train_only_new``
  every other parameter is frozen, so training changes only the new task's A_t. Each task's A_t is its own
  parameter (``prompt_fast.<id>``), so a frozen task has no gradient at all and optimizer state or weight
  decay can never touch it.

Task ids are needed in training and at inference. Nothing merges into W0: it is prompt tuning, so
``merge_and_unload`` and ``export_peft`` raise a MergeError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, help_field
from ..core.context import TaskContext
from ..core.lowrank import adapter_dtype, init_down_projection
from ..core.targets import set_submodule
from ..core.wrapping import ModuleWrapper, transformer_layers
from ..errors import ConfigError
from ..registry import MethodSpec, register_method

FAST_INITS = ("mean", "zeros", "random")
MERGE_ERROR = (
    "TA-LoRA is prompt-based: its update is gated attention over learned per-task prompt tokens, not a "
    "change of any weight matrix, so nothing can be merged into the base weights and it has no PEFT LoRA "
    "form; keep the adapter (MTModel) and pass task_ids at inference"
)


@dataclass
class TALoRAConfig(AdapterConfig):
    """TA-LoRA (reconstruction): per-layer deep prompts P_0 + B A_t, fast A_t and slow B, zero-init gates.

    ``target_modules`` does not apply (the prompted layers are ``prompt_layers``).
    """

    method = "ta_lora"
    prompt_length: int = help_field("Number l of prompt tokens per prompted layer.", default=10)
    prompt_layers: list[int] | None = help_field("1-based indices of the layers that get a prompt. None: ceil(L/2), "
                                                 "ceil(3L/4) and L for a model with L layers (14, 21, 28 for 28 "
                                                 "layers).", default=None)
    slow_lr_scale: float = help_field("param_groups: the slow weights (B, P_0) train at the prompt learning rate * "
                                      "slow_lr_scale; fast A_t and gates at the prompt learning rate.", default=0.1)
    prompt_lr_scale: float = help_field("param_groups: the prompt learning rate is the run's lr * prompt_lr_scale. "
                                        "Prompt tuning wants larger steps than weight-space LoRA (the demo: 36% at 1, "
                                        "71% at 5).", default=5.0)
    prompt_init_std: float = help_field("Standard deviation of the shared prompt P_0 at init (the scale of normalized "
                                        "hidden states).", default=1.0)

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        self.check_positive_int("prompt_length")
        if self.prompt_layers is not None:
            layers = self.prompt_layers
            valid = not isinstance(layers, int) and bool(layers) and all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in layers)
            self.check("prompt_layers", valid, "None or a non-empty list of 1-based layer indices (integers >= 1)")
            self.prompt_layers = list(self.prompt_layers)
        self.check_min("slow_lr_scale", 0)
        self.check_min("prompt_lr_scale", 0, strict=True)
        self.check_min("prompt_init_std", 0)
        if self.layers_to_transform is not None:
            raise ConfigError(f"{name}.layers_to_transform does not apply to TA-LoRA: choose the prompted "
                              f"layers with prompt_layers (1-based) instead")

    def requires_tasks(self) -> bool:
        return True

    def resolved_layers(self, num_layers: int) -> list[int]:
        """The 1-based prompted layers for a model with ``num_layers`` layers."""
        if self.prompt_layers is None:
            return sorted({max(1, math.ceil(num_layers * f)) for f in (0.5, 0.75)} | {num_layers})
        bad = [i for i in self.prompt_layers if i > num_layers]
        if bad:
            raise ConfigError(f"TALoRAConfig.prompt_layers {bad} exceed the model's {num_layers} layers "
                              f"(allowed: 1..{num_layers})")
        return sorted(set(self.prompt_layers))


def _projections(attn: nn.Module, who: str) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear | None]:
    for names in (("q_proj", "k_proj", "v_proj", "o_proj"), ("query", "key", "value", None)):
        mods = [getattr(attn, n, None) if n else None for n in names]
        if all(isinstance(m, nn.Linear) for m in mods[:3]):
            out = mods[3] if isinstance(mods[3], nn.Linear) else None
            return mods[0], mods[1], mods[2], out
    raise ConfigError(f"TA-LoRA: attention module {who} ({type(attn).__name__}) has no separate q/k/v "
                      f"projections (q_proj/k_proj/v_proj or query/key/value); fused-QKV attention is not "
                      f"supported")


class PromptAttention(ModuleWrapper):
    """Wraps one attention module and adds tanh(gate) * Attn(q, K(P_t), V(P_t)) to its output.

    Parameters: ``prompt_shared`` P_0 (l x d), ``prompt_slow`` B (l x r), ``prompt_fast`` [A_t (r x d)] one
    per task, ``prompt_gate`` g (heads,), zero at init.
    """

    prompted = True

    def __init__(self, base_layer: nn.Module, config: TALoRAConfig, context: TaskContext, name: str,
                 hidden_size: int) -> None:
        super().__init__(base_layer)
        q, k, v, o = _projections(base_layer, repr(name))
        weight = q.weight
        kw = {"device": weight.device, "dtype": adapter_dtype(weight)}
        self.context = context
        self.module_name = name
        self.init = config.init
        self.rank = config.r
        self.scale = config.scale
        cfg = getattr(base_layer, "config", None)
        head_dim = (getattr(base_layer, "head_dim", None) or getattr(base_layer, "attention_head_size", None)
                    or hidden_size // cfg.num_attention_heads)
        self.head_dim = int(head_dim)
        self.num_heads = q.out_features // self.head_dim
        self.num_kv_heads = k.out_features // self.head_dim
        self.scaling = float(getattr(base_layer, "scaling", self.head_dim ** -0.5))
        self.has_o_proj = o is not None
        l_p, d, r = config.prompt_length, hidden_size, config.r
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.prompt_shared = nn.Parameter(torch.empty(l_p, d, **kw))
        self.prompt_slow = nn.Parameter(torch.empty(l_p, r, **kw))
        self.prompt_fast = nn.ParameterList([nn.Parameter(torch.zeros(r, d, **kw)) for _ in config.tasks])
        self.prompt_gate = nn.Parameter(torch.zeros(self.num_heads, **kw))
        if kw["device"].type != "meta":  # a meta model (parameter counting) has no values to initialize
            nn.init.normal_(self.prompt_shared, std=config.prompt_init_std)
            init_down_projection(self.prompt_slow, config.init, r)

    @property
    def num_tasks(self) -> int:
        """How many tasks have a fast weight."""
        return len(self.prompt_fast)

    def task_prompts(self, task_ids: torch.Tensor) -> torch.Tensor:
        """P_t = P_0 + s B A_t for each id: (k, l, d)."""
        fast = torch.stack(list(self.prompt_fast))[task_ids.to(self.prompt_shared.device)]  # (k, r, d)
        return self.prompt_shared + self.scale * torch.einsum("lr,krd->kld", self.prompt_slow, fast)

    def _heads(self, x: torch.Tensor, heads: int, norm: str | None = None) -> torch.Tensor:
        x = x.reshape(*x.shape[:-1], heads, self.head_dim)
        norm_layer = getattr(self.base_layer, norm, None) if norm else None
        if isinstance(norm_layer, nn.Module):  # Qwen3/Gemma3-style per-head q/k norms
            x = norm_layer(x)
        return x.transpose(1, 2)  # (b, heads, len, head_dim)

    def prompt_attention(self, h: torch.Tensor) -> torch.Tensor:
        """The gated prompt attention for hidden states h (b, n, d), in the layer's output space."""
        ids = self.context.require_task_ids(f"TA-LoRA ({self.module_name})", h.shape[0])
        q_proj, k_proj, v_proj, o_proj = _projections(self.base_layer, repr(self.module_name))
        prompts = self.dropout(self.task_prompts(ids)).to(h.dtype)  # (b, l, d)
        q = self._heads(q_proj(h), self.num_heads, "q_norm")
        k = self._heads(k_proj(prompts), self.num_kv_heads, "k_norm")
        v = self._heads(v_proj(prompts), self.num_kv_heads)
        if self.num_kv_heads != self.num_heads:  # grouped-query attention: each kv head serves a group
            k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
            v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        scores = torch.softmax((q @ k.transpose(-1, -2)).float() * self.scaling, dim=-1)  # (b, H, n, l)
        out = scores.to(v.dtype) @ v  # (b, H, n, hd)
        gate = torch.tanh(self.prompt_gate).to(out.dtype)
        out = (out * gate[None, :, None, None]).transpose(1, 2).reshape(*h.shape[:-1], -1)
        if o_proj is not None:
            out = F.linear(out, o_proj.weight)  # no bias: the base attention output already has it
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The attention output plus the gated prompt attention (added to element 0 of the tuple)."""
        out = self.base_layer(*args, **kwargs)
        h = self.first_input(args, kwargs)
        return self.add_to_output(out, self.prompt_attention(h))

    def add_fast_weight(self, init: str | int) -> None:
        """Append a fast weight A_t: 'mean' of the existing ones, 'zeros', 'random' (as LoRA's A) or a copy of
        task id ``init``."""
        ref = self.prompt_shared
        with torch.no_grad():
            if init == "zeros" or (init == "mean" and self.num_tasks == 0):
                new = torch.zeros(self.rank, ref.shape[1], device=ref.device, dtype=ref.dtype)
            elif init == "mean":
                new = torch.stack([p.detach() for p in self.prompt_fast]).mean(0)
            elif init == "random":
                new = torch.empty(self.rank, ref.shape[1], device=ref.device, dtype=ref.dtype)
                init_down_projection(new, self.init, self.rank)
            else:
                new = self.prompt_fast[int(init)].detach().clone()
        self.prompt_fast.append(nn.Parameter(new))

    def extra_repr(self) -> str:
        return (f"prompt_length={self.prompt_shared.shape[0]}, rank={self.rank}, tasks={self.num_tasks}, "
                f"heads={self.num_heads}/{self.num_kv_heads}")


def find_attention_modules(model: nn.Module) -> list[tuple[int, str]]:
    """(0-based layer index, attention module name) for every transformer layer."""
    found = []
    for index, (lname, layer, style) in enumerate(transformer_layers(model)):
        prefix = f"{lname}." if lname else ""
        if style == "decoder" and hasattr(layer, "self_attn"):
            found.append((index, prefix + "self_attn"))
        elif style == "encoder":
            found.append((index, prefix + "attention.self"))
    if not found:
        raise ConfigError(f"TA-LoRA: {type(model).__name__} has no transformer layers with an attention "
                          f"module mtpeft can find (a `self_attn` child, or BERT-style `attention.self`)")
    return found


def inject(model: nn.Module, config: TALoRAConfig, context: TaskContext) -> dict[str, nn.Module]:
    """Wrap the attention modules of the prompted layers."""
    modules = find_attention_modules(model)
    cfg = getattr(model, "config", None)
    num_layers = len(modules)
    chosen = set(config.resolved_layers(num_layers))
    layers: dict[str, nn.Module] = {}
    for index, name in modules:
        if index + 1 not in chosen:
            continue
        attn = model.get_submodule(name)
        hidden = getattr(cfg, "hidden_size", None) or _projections(attn, repr(name))[0].in_features
        wrapper = PromptAttention(attn, config, context, name, int(hidden))
        set_submodule(model, name, wrapper)
        layers[name] = wrapper
    return layers


def _wrappers(model) -> list[PromptAttention]:
    return [m for m in model.adapter_layers.values() if isinstance(m, PromptAttention)]


def param_groups(model, lr: float, weight_decay: float = 0.0, slow_lr_scale: float | None = None,
                 **_: Any) -> list[dict[str, Any]]:
    """Fast weights A_t and gates at ``lr * prompt_lr_scale``; slow weights B and P_0 at that times
    ``slow_lr_scale``."""
    scale = model.adapter_config.slow_lr_scale if slow_lr_scale is None else float(slow_lr_scale)
    lr = lr * model.adapter_config.prompt_lr_scale
    fast, slow, gates = [], [], []
    for name, p in model.trainable_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("prompt_shared", "prompt_slow"):
            slow.append(p)
        elif leaf == "prompt_gate":
            gates.append(p)
        else:  # prompt_fast.<id> and modules_to_save
            fast.append(p)
    groups = [("fast", fast, lr), ("slow", slow, lr * scale), ("gates", gates, lr)]
    return [{"params": ps, "lr": group_lr, "weight_decay": weight_decay, "name": group}
            for group, ps, group_lr in groups if ps]


def freeze_except_task(model, task: int | str) -> None:
    """Freeze every parameter except the fast weights A_t of ``task`` (few-shot adaptation of one task)."""
    tid = model.task_index(task)
    for p in model.parameters():
        p.requires_grad_(False)
    for wrapper in _wrappers(model):
        wrapper.prompt_fast[tid].requires_grad_(True)


def add_task(model, name: str, init: str = "mean", train_only_new: bool = False) -> int:
    """Add task ``name`` with a new fast weight in every prompted layer; returns its id.

    ``init``: 'mean' (of the existing tasks' fast weights), 'zeros', 'random', or the name of an existing task
    to copy (the keywords take precedence over task names). ``train_only_new``: freeze everything except the
    new fast weights.
    """
    tasks = model.adapter_config.tasks
    if init in FAST_INITS:
        source: str | int = init
    elif isinstance(init, str) and init in tasks:
        source = tasks.index(init)
    else:
        raise ValueError(f"add_task init must be one of {list(FAST_INITS)} or an existing task name {tasks}, "
                         f"got {init!r}")
    for wrapper in _wrappers(model):
        wrapper.add_fast_weight(source)
    tasks.append(name)
    tid = len(tasks) - 1
    if train_only_new:
        freeze_except_task(model, tid)
    else:
        for wrapper in _wrappers(model):
            wrapper.prompt_fast[tid].requires_grad_(True)
    return tid


def describe(model) -> str:
    """Which layers carry prompts, and the prompt shape."""
    cfg: TALoRAConfig = model.adapter_config
    wrappers = _wrappers(model)
    return (f"TA-LoRA: prompts at {len(wrappers)} layers {list(model.adapter_layers)}, "
            f"length {cfg.prompt_length}, rank {cfg.r}, {len(cfg.tasks)} tasks, "
            f"slow lr scale {cfg.slow_lr_scale:g}")


register_method(MethodSpec(
    name="ta_lora", config_class=TALoRAConfig, inject=inject, param_groups=param_groups, add_task=add_task,
    describe=describe, merge="none", merge_error=MERGE_ERROR, task_ids_at_inference=True,
    task_ids_in_training=True,
    description="Deep prompts P_0 + B A_t (slow B, fast A_t) through zero-init gated attention "
                "(reconstruction).",
))
