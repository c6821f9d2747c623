"""TA-LoRA (Zhang et al., ICME 2025): task-adaptive low-rank prompts, fast/slow weights (reconstructed).

Only the abstract-level description of TA-LoRA was available (no paper body, no code), so this module
implements the reading in ``docs/methods.md`` section 4.2 and makes each uncertain choice explicit (the layers
themselves are in :mod:`mtpeft.core.prompts`):

- **Prompt.** Task t's prompt is P_t = P_0 + s * B A_t (l_p x d): P_0 (shared, l_p x d), the slow weight B
  (l_p x r, shared across tasks) and the fast weight A_t (r x d, one per task); s = alpha / r as in LoRA.
  Init: B Kaiming-uniform (``init``), A_t = 0, so every task starts from the shared prompt P_0 and the low-rank
  part grows from zero.
- **Where it sits** (``prompt_position``). ``'input'``: the abstract's "adaptable vector ... which acts as a
  prefix to the original prompt" -- one prompt in embedding space (P_0 starts as the embeddings of random
  vocabulary tokens), processed by the model as a prefix; the layers in ``layers_to_transform`` (default all)
  let the real tokens attend to the prefix's hidden states. Under causal attention a prefix never sees what
  follows it, so it is run through the decoder on its own (one row per distinct task of the batch) and the real
  tokens keep their positions, mask and KV cache. ``'deep'``: one prompt per chosen layer, fed straight to that
  layer's attention (P_0 ~ N(0, ``prompt_init_std``^2), the normalized hidden space); default layers ceil(L/2),
  ceil(3L/4), L (14, 21, 28 for 28 layers, the layers of the paper's similarity analysis).
- **Layers.** ``layers_to_transform`` (0-based, as every method). ``prompt_layers`` (1-based) is its older
  spelling, still read from existing configs.
- **Zero-initialized gated attention** (LLaMA-Adapter style). The chosen layers' attention module is wrapped;
  from the hidden states it receives (the ``input_layernorm`` output) it computes queries with the module's
  own q_proj, keys / values of the prompt with its own k_proj / v_proj (biases included, grouped-query heads
  repeated; ``q_norm`` / ``k_norm`` applied), a softmax over the prompt keys only (separate from the
  sequence's softmax) and maps the result through o_proj's weight. No rotary embedding on the prompt (position-
  free prompt keys, un-rotated queries). What the zero-init gate covers is ``gate``: ``'prompt'`` gates each
  head's whole prompt attention with tanh(g_h) (g = 0: the model starts exactly equal to the base, but at init
  only the gates get a gradient; P_0, B and A_t follow once the gates open); ``'task'`` gates only the
  task-specific part, P_t = P_0 + tanh(g) s B A_t with A_t starting random (training starts as plain prompt
  tuning with P_0, which learns from the first step; the low-rank part enters as the gate opens).
- **Default: deep prompts with the whole-prompt gate** (``prompt_position='deep'``, ``gate='prompt'``), chosen
  by measurement: ``mtpeft demo --method ta_lora --steps 80 --set method.prompt_position=P --set method.gate=G
  --set eval.before_training=false`` (CPU, same seed and data), training loss at step 10: deep/prompt 2.58,
  input/prompt 4.52, input/task 9.19, deep/task 19.12; at steps 20 / 40 / 80: deep/prompt 1.17 / 0.57 / 0.40,
  input/prompt 2.65 / 1.51 / 0.78; macro score after 80 steps: deep/prompt 71.2% (arithmetic 17.5, reverse
  90.0, extract 100, category 77.5), input/prompt 46.9% (20.0, 27.5, 100, 40.0), input/task 35.6% (15.0,
  17.5, 90.0, 20.0), deep/task 8.8% (0, 0, 2.5, 32.5); final losses input/task 1.22, deep/task 3.41. The
  'task' gate adds the ungated prompt attention of P_0 at full weight from the first step and throws the model
  far off the base; the input prefix learns much more slowly; and it runs a second pass through the layers,
  which FSDP does not support (it is refused there). One seed, 40 test items per task: a coarse ranking.
- **Fast / slow learning rates.** ``param_groups(model, lr, weight_decay, slow_lr_scale=...)``: the fast
  weights A_t (and the gates) train at lr * ``prompt_lr_scale``, the slow B and P_0 at that times
  ``slow_lr_scale`` (0.1). ``prompt_lr_scale`` (5) exists because prompt tuning wants larger steps than a
  weight-space LoRA, and a run config usually has one lr for every method. Measured with ``mtpeft demo
  --method ta_lora`` (deep prompts, 80 steps, CPU, lr 2e-3): macro 36.2% with a scale of 1 and 71.2% with 5.
  MTL-LoRA reaches 88.8% there.
- **New tasks** (the paper's few-shot target adaptation). ``model.add_task(name, init='mean' | 'zeros' |
  'random' | <existing task>, train_only_new=False)`` appends a fast weight to every layer that holds a prompt;
  with ``train_only_new`` every other parameter is frozen, so training changes only the new task's A_t. Each
  task's A_t is its own parameter (``prompt_fast.<id>``), so a frozen task has no gradient at all and
  optimizer state or weight decay can never touch it.

Task ids are needed in training and at inference. Nothing merges into W0: it is prompt tuning, so
``merge_and_unload`` and ``export_peft`` raise a MergeError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..config import AdapterConfig, help_field
from ..core.context import TaskContext
from ..core.prompts import (
    FAST_INITS,
    GATES,
    InputPrompt,
    LowRankPrompt,
    PrefixStates,
    PromptAttention,
    attention_projections,
)
from ..core.targets import set_submodule
from ..core.wrapping import transformer_layers
from ..errors import ConfigError
from ..registry import MethodSpec, register_method

POSITIONS = ("input", "deep")
MERGE_ERROR = (
    "TA-LoRA is prompt-based: its update is gated attention over learned per-task prompt tokens, not a "
    "change of any weight matrix, so nothing can be merged into the base weights and it has no PEFT LoRA "
    "form; keep the adapter (MTModel) and pass task_ids at inference"
)


@dataclass
class TALoRAConfig(AdapterConfig):
    """TA-LoRA (reconstruction): prompts P_0 + B A_t (fast A_t, slow B) at the input or deep, zero-init gates.

    ``target_modules`` does not apply; ``layers_to_transform`` (0-based, as every method) chooses the layers whose
    attention reads the prompt.
    """

    method = "ta_lora"
    prompt_length: int = help_field("Number l of prompt tokens.", default=10)
    prompt_position: str = help_field(
        "'input': one prompt prepended to the input embeddings (a prefix the model processes; every layer in "
        "layers_to_transform, default all, attends to its hidden states); 'deep': one prompt per layer, fed to "
        "that layer's attention (default layers ceil(L/2), ceil(3L/4), L).", default="deep")
    gate: str = help_field(
        "'prompt': a zero-init tanh gate per head on the whole prompt attention (the model starts equal to the "
        "base, but at init only the gates get a gradient); 'task': a zero-init gate on the task-specific part "
        "B A_t only (training starts as plain prompt tuning with P_0; A_t starts random).", default=GATES[0])
    prompt_layers: list[int] | None = help_field("Older spelling of layers_to_transform, 1-based (kept for existing "
                                                 "configs): [21, 30] = layers_to_transform [20, 29].", default=None)
    slow_lr_scale: float = help_field("param_groups: the slow weights (B, P_0) train at the prompt learning rate * "
                                      "slow_lr_scale; fast A_t and gates at the prompt learning rate.", default=0.1)
    prompt_lr_scale: float = help_field("param_groups: the prompt learning rate is the run's lr * prompt_lr_scale. "
                                        "Prompt tuning wants larger steps than weight-space LoRA (the demo: 36% at 1, "
                                        "71% at 5).", default=5.0)
    prompt_init_std: float = help_field("Deep prompts: standard deviation of P_0 at init (the scale of normalized "
                                        "hidden states). Input prompts start from embeddings of random tokens.",
                                        default=1.0)

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        self.check_positive_int("prompt_length")
        self.check("prompt_position", self.prompt_position in POSITIONS, f"one of {list(POSITIONS)}")
        self.check("gate", self.gate in GATES, f"one of {list(GATES)}")
        if self.prompt_layers is not None:
            layers = self.prompt_layers
            valid = not isinstance(layers, int) and bool(layers) and all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in layers)
            self.check("prompt_layers", valid, "None or a non-empty list of 1-based layer indices (integers >= 1)")
            self.prompt_layers = list(self.prompt_layers)
            if self.layers_to_transform is not None:
                raise ConfigError(f"{name}: set layers_to_transform (0-based) or its older 1-based spelling "
                                  f"prompt_layers, not both")
        self.check_min("slow_lr_scale", 0)
        self.check_min("prompt_lr_scale", 0, strict=True)
        self.check_min("prompt_init_std", 0)

    def requires_tasks(self) -> bool:
        return True

    def resolved_layers(self, num_layers: int) -> list[int]:
        """The 1-based layers whose attention reads the prompt, for a model with ``num_layers`` layers."""
        if self.prompt_layers is not None:
            key, chosen = "prompt_layers", list(self.prompt_layers)
        elif self.layers_to_transform is not None:
            key, chosen = "layers_to_transform", [int(i) + 1 for i in self.layers_to_transform]
        elif self.prompt_position == "input":
            return list(range(1, num_layers + 1))
        else:
            return sorted({max(1, math.ceil(num_layers * f)) for f in (0.5, 0.75)} | {num_layers})
        bad = [i for i in chosen if not 1 <= i <= num_layers]
        if bad:
            shown = bad if key == "prompt_layers" else [i - 1 for i in bad]
            allowed = f"1..{num_layers}" if key == "prompt_layers" else f"0..{num_layers - 1}"
            raise ConfigError(f"TALoRAConfig.{key} {shown} exceed the model's {num_layers} layers (allowed: "
                              f"{allowed})")
        return sorted(set(chosen))


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


def _decoder(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(decoder, nn.Module):
        raise ConfigError(f"TA-LoRA prompt_position 'input': {type(model).__name__} has no decoder module "
                          f"(get_decoder()); use prompt_position: deep")
    return decoder


def _wrap_input_embedding(model: nn.Module, config: TALoRAConfig, context: TaskContext,
                          prefix: PrefixStates) -> tuple[str, InputPrompt]:
    embedding = model.get_input_embeddings()
    name = next((n for n, m in model.named_modules() if m is embedding), None)
    if not isinstance(embedding, nn.Embedding) or name is None:
        raise ConfigError(f"TA-LoRA prompt_position 'input': {type(model).__name__} has no nn.Embedding input "
                          f"embedding; use prompt_position: deep")
    wrapper = InputPrompt(embedding, context, prefix, length=config.prompt_length, rank=config.r,
                          num_tasks=len(config.tasks), scale=config.scale, init=config.init, gate=config.gate,
                          dropout=config.dropout)
    set_submodule(model, name, wrapper)
    return name, wrapper


def inject(model: nn.Module, config: TALoRAConfig, context: TaskContext) -> dict[str, nn.Module]:
    """Wrap the chosen layers' attention modules (and, for an input prompt, the input embedding)."""
    modules = find_attention_modules(model)
    cfg = getattr(model, "config", None)
    chosen = set(config.resolved_layers(len(modules)))
    layers: dict[str, nn.Module] = {}
    prefix = None
    if config.prompt_position == "input":
        if any(not name.endswith("self_attn") for _, name in modules):
            raise ConfigError("TA-LoRA prompt_position 'input' needs a causal decoder (a prefix of a "
                              "bidirectional encoder would see the tokens after it); use prompt_position: deep")
        decoder = _decoder(model)
        prefix = PrefixStates(lambda: decoder)
        name, wrapper = _wrap_input_embedding(model, config, context, prefix)
        layers[name] = wrapper

    def shared_init(p):
        nn.init.normal_(p, std=config.prompt_init_std)

    prompt = {"length": config.prompt_length, "rank": config.r, "num_tasks": len(config.tasks),
              "scale": config.scale, "init": config.init, "shared_init": shared_init}
    for index, name in modules:
        if index + 1 not in chosen:
            continue
        attn = model.get_submodule(name)
        hidden = getattr(cfg, "hidden_size", None) or attention_projections(attn, repr(name))[0].in_features
        wrapper = PromptAttention(attn, name, int(hidden), context, gate=config.gate, prefix=prefix,
                                  dropout=config.dropout, prompt=prompt)
        set_submodule(model, name, wrapper)
        layers[name] = wrapper
    return layers


def _prompt_holders(model) -> list[nn.Module]:
    """The layers that hold prompt parameters (and so one fast weight per task)."""
    return [m for m in model.adapter_layers.values() if isinstance(m, LowRankPrompt) and hasattr(m, "prompt_fast")]


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
    for wrapper in _prompt_holders(model):
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
    for wrapper in _prompt_holders(model):
        wrapper.add_fast_weight(source)
    tasks.append(name)
    tid = len(tasks) - 1
    if train_only_new:
        freeze_except_task(model, tid)
    else:
        for wrapper in _prompt_holders(model):
            wrapper.prompt_fast[tid].requires_grad_(True)
    return tid


def describe(model) -> str:
    """Where the prompt sits, which layers read it, and its shape."""
    cfg: TALoRAConfig = model.adapter_config
    attention = [n for n, m in model.adapter_layers.items() if isinstance(m, PromptAttention)]
    return (f"TA-LoRA ({cfg.prompt_position} prompt, gate {cfg.gate}): prompts at {len(attention)} layers "
            f"{attention}, length {cfg.prompt_length}, rank {cfg.r}, {len(cfg.tasks)} tasks, slow lr scale "
            f"{cfg.slow_lr_scale:g}")


register_method(MethodSpec(
    name="ta_lora", config_class=TALoRAConfig, inject=inject, param_groups=param_groups, add_task=add_task,
    describe=describe, merge="none", merge_error=MERGE_ERROR, task_ids_at_inference=True,
    task_ids_in_training=True,
    description="Prompts P_0 + B A_t (slow B, fast A_t), input-level or deep, through zero-init gated "
                "attention (reconstruction).",
))
