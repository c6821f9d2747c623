"""Prompt-based adapter layers: low-rank per-task prompts and zero-init gated prompt attention (TA-LoRA).

A task's prompt is P_t = P_0 + g * s * B A_t (length l x width d): the shared P_0, a slow factor B (l x r)
shared by every task and one fast factor A_t (r x d) per task; g is 1, or tanh(gate) when only the
task-specific part is gated (``gate='task'``). Two placements:

- **deep**: a :class:`PromptAttention` at each chosen layer holds its own prompt, read by the layer's queries;
- **input**: one :class:`InputPrompt` around the input embedding holds the prompt, which enters the model as a
  prefix of embeddings. Under causal attention a prefix never sees the tokens after it, so its hidden state at
  every layer depends on the task only: the :class:`InputPrompt` runs the decoder on the prefix alone once per
  forward (one row per distinct task in the batch), the chosen layers' :class:`PromptAttention` record the
  prefix's hidden states (:class:`PrefixStates`) and the real tokens then attend to them at those layers. The
  real tokens keep their own positions, attention mask and KV cache untouched, which is what lets the model
  start exactly equal to the base (the gate) and generate with the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .lowrank import adapter_dtype, init_down_projection
from .wrapping import ModuleWrapper

GATES = ("prompt", "task")
FAST_INITS = ("mean", "zeros", "random")


def attention_projections(attn: nn.Module, who: str) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear | None]:
    """(q, k, v, output-or-None) linears of an attention module (decoder or BERT-style)."""
    for names in (("q_proj", "k_proj", "v_proj", "o_proj"), ("query", "key", "value", None)):
        mods = [getattr(attn, n, None) if n else None for n in names]
        if all(isinstance(m, nn.Linear) for m in mods[:3]):
            out = mods[3] if isinstance(mods[3], nn.Linear) else None
            return mods[0], mods[1], mods[2], out
    raise ConfigError(f"TA-LoRA: attention module {who} ({type(attn).__name__}) has no separate q/k/v "
                      f"projections (q_proj/k_proj/v_proj or query/key/value); fused-QKV attention is not "
                      f"supported")


class PrefixStates:
    """What one forward's input-prefix pass left for the prompted layers (a plain object, not a module).

    ``states[layer]``: the prefix's hidden states entering that layer's attention (u, l, d), one row per distinct
    task; ``rows``: for each batch row (each token, for per-token ids), its row in ``states``; ``task_ids``: the ids
    tensor they were made for.
    """

    def __init__(self, decoder: Callable[[], nn.Module]) -> None:
        self.decoder = decoder  # a function, so that the decoder is not registered as a child module
        self.recording = False
        self.states: dict[str, torch.Tensor] = {}
        self.rows: torch.Tensor | None = None
        self.task_ids: torch.Tensor | None = None
        self.key: tuple | None = None
        self.sharded: bool | None = None  # whether the decoder's layers are FSDP-sharded (checked once)

    def prompts_for(self, layer: str, task_ids: torch.Tensor) -> torch.Tensor:
        """The prefix states of ``layer`` for each batch row (b, l, d)."""
        states, rows = self.unique_prompts(layer, task_ids)
        return states[rows]

    def unique_prompts(self, layer: str, task_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix states of ``layer`` once per distinct task (u, l, d), and each row's (or, for per-token
        ids, each token's) index into them."""
        if self.task_ids is not task_ids or layer not in self.states:
            raise ValueError("TA-LoRA input prompt: this forward did not pass through the input embedding, so the "
                             "prefix was not computed; call the model with input_ids (not inputs_embeds), or "
                             "use prompt_position: deep")
        return self.states[layer], self.rows


class LowRankPrompt:
    """Mixin: the prompt parameters ``prompt_shared`` P_0 (l x d), ``prompt_slow`` B (l x r), ``prompt_fast``
    [A_t (r x d)] and, with ``gate='task'``, ``prompt_gate`` (1,) on the task-specific part."""

    prompted = True

    def init_prompt(self, length: int, width: int, rank: int, num_tasks: int, *, scale: float, init: str,
                    gate: str, shared_init: Callable[[torch.Tensor], None], kw: dict[str, Any]) -> None:
        self.rank, self.scale, self.init, self.gate_mode = rank, scale, init, gate
        self.prompt_shared = nn.Parameter(torch.empty(length, width, **kw))
        self.prompt_slow = nn.Parameter(torch.empty(length, rank, **kw))
        self.prompt_fast = nn.ParameterList([nn.Parameter(torch.zeros(rank, width, **kw)) for _ in range(num_tasks)])
        if gate == "task":
            self.prompt_gate = nn.Parameter(torch.zeros(1, **kw))
        if kw["device"].type == "meta":  # a meta model (parameter counting) has no values to initialize
            return
        with torch.no_grad():
            shared_init(self.prompt_shared)
            init_down_projection(self.prompt_slow, init, rank)
            if gate == "task":  # behind a zero gate A_t must not be zero too, or neither would ever get a gradient
                for fast in self.prompt_fast:
                    init_down_projection(fast, init, rank)

    @property
    def num_tasks(self) -> int:
        """How many tasks have a fast weight."""
        return len(self.prompt_fast)

    def task_prompts(self, task_ids: torch.Tensor) -> torch.Tensor:
        """P_t = P_0 + g s B A_t for each id: (k, l, d)."""
        fast = torch.stack(list(self.prompt_fast))[task_ids.to(self.prompt_shared.device)]  # (k, r, d)
        delta = self.scale * torch.einsum("lr,krd->kld", self.prompt_slow, fast)
        if self.gate_mode == "task":
            delta = torch.tanh(self.prompt_gate) * delta
        return self.prompt_shared + delta

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


class PromptAttention(ModuleWrapper, LowRankPrompt):
    """Wraps one attention module and adds w * Attn(q, K(P), V(P)) to its output: a softmax over the prompt keys
    only, w = tanh(g_h) per head (zero at init) with ``gate='prompt'``, else 1.

    Deep placement (``prefix`` None): the layer holds its own prompt (:class:`LowRankPrompt` parameters). Input
    placement: P is the input prefix's hidden state at this layer, from ``prefix``. Queries come from the
    module's own q_proj, prompt keys / values from its k_proj / v_proj (biases included, grouped-query heads
    repeated, ``q_norm`` / ``k_norm`` applied when present), with no rotary embedding (position-free prompt
    keys, un-rotated queries), mapped through o_proj's weight (no bias: the base output has it). Recomputed on
    every call from the current queries, so it works unchanged with the KV cache.
    """

    def __init__(self, base_layer: nn.Module, name: str, hidden_size: int, context: Any, *, gate: str,
                 prefix: PrefixStates | None = None, dropout: float = 0.0,
                 prompt: dict[str, Any] | None = None) -> None:
        super().__init__(base_layer)
        q, k, _, o = attention_projections(base_layer, repr(name))
        kw = {"device": q.weight.device, "dtype": adapter_dtype(q.weight)}
        self.context, self.module_name, self.prefix = context, name, prefix
        cfg = getattr(base_layer, "config", None)
        head_dim = (getattr(base_layer, "head_dim", None) or getattr(base_layer, "attention_head_size", None)
                    or hidden_size // cfg.num_attention_heads)
        self.head_dim = int(head_dim)
        self.num_heads = q.out_features // self.head_dim
        self.num_kv_heads = k.out_features // self.head_dim
        self.scaling = float(getattr(base_layer, "scaling", self.head_dim ** -0.5))
        self.has_o_proj = o is not None
        self.gate_mode = gate
        self.prompted = prefix is None  # an input-placement layer holds no prompt of its own
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if prefix is None:
            self.init_prompt(prompt["length"], hidden_size, prompt["rank"], prompt["num_tasks"], scale=prompt["scale"],
                             init=prompt["init"], gate=gate, shared_init=prompt["shared_init"], kw=kw)
        if gate == "prompt":
            self.prompt_gate = nn.Parameter(torch.zeros(self.num_heads, **kw))

    def _heads(self, x: torch.Tensor, heads: int, norm: str | None = None) -> torch.Tensor:
        x = x.reshape(*x.shape[:-1], heads, self.head_dim)
        norm_layer = getattr(self.base_layer, norm, None) if norm else None
        if isinstance(norm_layer, nn.Module):  # Qwen3/Gemma3-style per-head q/k norms
            x = norm_layer(x)
        return x.transpose(1, 2)  # (b, heads, len, head_dim)

    def prompt_attention(self, h: torch.Tensor) -> torch.Tensor:
        """The (gated) prompt attention for hidden states h (b, n, d), in the layer's output space."""
        ids = self.context.task_ids_for(f"TA-LoRA ({self.module_name})", h)
        q_proj, _, _, o_proj = attention_projections(self.base_layer, repr(self.module_name))
        q = self._heads(q_proj(h), self.num_heads, "q_norm")  # (b, H, n, hd)
        if ids.dim() == 2:  # packed rows: every token reads its own task's prompt
            if self.prefix is None:
                unique, which = torch.unique(ids, return_inverse=True)
                prompts = self.dropout(self.task_prompts(unique))
            else:
                prompts, which = self.prefix.unique_prompts(self.module_name, ids)
            out = self._attend_per_token(q, *self._prompt_kv(prompts.to(h.dtype)), which)
        else:
            if self.prefix is None:
                prompts = self.dropout(self.task_prompts(ids))
            else:
                prompts = self.prefix.prompts_for(self.module_name, ids)
            k, v = self._prompt_kv(prompts.to(h.dtype))  # (b, H, l, hd) each
            out = (self._softmax(q @ k.transpose(-1, -2)).to(v.dtype) @ v).transpose(1, 2)  # (b, n, H, hd)
        if self.gate_mode == "prompt":
            out = out * torch.tanh(self.prompt_gate).to(out.dtype)[:, None]
        out = out.reshape(*h.shape[:-1], -1)
        if o_proj is not None:
            out = F.linear(out, o_proj.weight)  # no bias: the base attention output already has it
        return out

    def _prompt_kv(self, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (k, H, l, hd) of prompts (k, l, d), grouped-query heads repeated."""
        _, k_proj, v_proj, _ = attention_projections(self.base_layer, repr(self.module_name))
        k = self._heads(k_proj(prompts), self.num_kv_heads, "k_norm")
        v = self._heads(v_proj(prompts), self.num_kv_heads)
        if self.num_kv_heads != self.num_heads:  # grouped-query attention: each kv head serves a group
            k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
            v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        return k, v

    def _softmax(self, scores: torch.Tensor) -> torch.Tensor:
        """Softmax over the prompt keys, in at least fp32."""
        return torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)) * self.scaling, dim=-1)

    def _attend_per_token(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """Prompt attention where token (b, n) reads prompt ``which[b, n]`` of k, v (u, H, l, hd): the tokens of
        each distinct prompt in one batched product, (b, n, H, hd)."""
        b, heads, n, hd = q.shape
        tokens = q.transpose(1, 2).reshape(b * n, heads, hd)
        out = tokens.new_zeros(b * n, heads, hd, dtype=v.dtype)
        which = which.reshape(-1)
        for u in range(k.shape[0]):
            rows = (which == u).nonzero().squeeze(1)
            if rows.numel():
                qu = tokens[rows].transpose(0, 1)  # (H, N, hd)
                attended = self._softmax(qu @ k[u].transpose(-1, -2)).to(v.dtype) @ v[u]  # (H, N, hd)
                out = out.index_copy(0, rows, attended.transpose(0, 1))
        return out.reshape(b, n, heads, hd)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The attention output plus the prompt attention (added to element 0 of the tuple); during the input
        prefix's own pass, the attention output unchanged and the prefix's hidden states recorded."""
        out = self.base_layer(*args, **kwargs)
        h = self.first_input(args, kwargs)
        if self.prefix is not None and self.prefix.recording:
            self.prefix.states[self.module_name] = h
            return out
        return self.add_to_output(out, self.prompt_attention(h))

    def extra_repr(self) -> str:
        where = "input prefix" if self.prefix is not None else f"own prompt of length {self.prompt_shared.shape[0]}"
        return f"{where}, gate={self.gate_mode}, heads={self.num_heads}/{self.num_kv_heads}"


class InputPrompt(ModuleWrapper, LowRankPrompt):
    """Wraps the input embedding: holds the input-level prompt and, on every forward, runs the decoder on the
    per-task prefix alone so that the prompted layers can attend to its hidden states (:class:`PrefixStates`).
    The embedding output itself (the real tokens) is returned unchanged."""

    prompted = True

    def __init__(self, base_layer: nn.Embedding, context: Any, prefix: PrefixStates, *, length: int, rank: int,
                 num_tasks: int, scale: float, init: str, gate: str, dropout: float = 0.0) -> None:
        super().__init__(base_layer)
        weight = base_layer.weight
        kw = {"device": weight.device, "dtype": adapter_dtype(weight)}
        self.context, self.prefix = context, prefix
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        def from_vocabulary(p: torch.Tensor) -> None:  # prompt tuning's usual init: embeddings of random tokens
            rows = torch.randint(0, weight.shape[0], (p.shape[0],), device=weight.device)
            p.copy_(weight.detach()[rows].to(p.dtype))

        self.init_prompt(length, weight.shape[1], rank, num_tasks, scale=scale, init=init, gate=gate,
                         shared_init=from_vocabulary, kw=kw)

    def _prompt_key(self, ids: torch.Tensor) -> tuple:
        versions = tuple(p._version for p in self.parameters(recurse=False))
        versions += tuple(p._version for p in self.prompt_fast)
        return id(ids), versions, self.training

    def run_prefix(self, ids: torch.Tensor, dtype: torch.dtype) -> None:
        """Run the decoder on one prefix per distinct task in ``ids`` and keep the prompted layers' states."""
        prefix = self.prefix
        key = self._prompt_key(ids)
        if not torch.is_grad_enabled() and prefix.task_ids is ids and prefix.key == key:
            return  # generation: the same prefix for every new token
        decoder = prefix.decoder()
        if prefix.sharded is None:
            prefix.sharded = any(type(m).__name__.startswith("FSDP") for m in decoder.modules())
        if prefix.sharded:  # the prefix's second pass through sharded layers crashed FSDP2 (SIGSEGV) in a test
            raise ConfigError("TA-LoRA prompt_position 'input' does not run under FSDP (the prefix is a second "
                              "pass through the sharded layers); use prompt_position: deep, or DDP")
        unique, rows = torch.unique(ids, return_inverse=True)
        embeds = self.dropout(self.task_prompts(unique)).to(dtype)  # (u, l, d)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        prefix.states, prefix.recording = {}, True
        try:
            decoder(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
        finally:
            prefix.recording = False
        prefix.rows, prefix.task_ids = rows, ids
        prefix.key = None if torch.is_grad_enabled() else key

    def forward(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The token embeddings (unchanged); computes this forward's prefix states first."""
        out = self.base_layer(input_ids, *args, **kwargs)
        if not self.prefix.recording:
            ids = self.context.require_task_ids("TA-LoRA (input prompt)", out.shape[0])
            self.run_prefix(ids, out.dtype)
        return out

    def extra_repr(self) -> str:
        return (f"prompt_length={self.prompt_shared.shape[0]}, rank={self.rank}, tasks={self.num_tasks}, "
                f"gate={self.gate_mode}")
