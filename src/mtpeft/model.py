"""MTModel: adapter injection, task-id plumbing, auxiliary losses, save/load, merge and export."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import AdapterConfig, ConfigError, config_from_dict, get_method
from .core.distributed import fsdp_root_unsharded
from .core.layers import LinearAdapter, TaskContext
from .core.quant import dense_linear, dequantize_rest, is_quantized
from .core.targets import find_target_linears, set_submodule
from .errors import AdapterLoadError, MergeError
from .io.atomic import atomic_write_dir

CONFIG_NAME = "mtpeft_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


TaskIds = torch.Tensor | Sequence[int] | Sequence[str] | int | str | None


def base_model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies the base model an adapter was made for."""
    cfg = getattr(model, "config", None)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size",
            "num_attention_heads", "num_key_value_heads")
    out = {k: getattr(cfg, k) for k in keys if cfg is not None and getattr(cfg, k, None) is not None}
    out["class"] = type(model).__name__
    out["name_or_path"] = getattr(cfg, "_name_or_path", "") if cfg is not None else ""
    return out


class MTModel(nn.Module):
    """A Hugging Face model with multi-task adapters injected in place and the base frozen.

    Use :func:`get_mt_model` to build one and :meth:`from_pretrained` to load a saved adapter.
    ``forward`` and ``generate`` take ``task_ids`` per sample (a LongTensor, a list of ids or task names, or
    one id/name for the whole batch). ``out.loss`` is the model loss plus the method's weighted auxiliary
    losses (in training mode); ``out.aux_losses`` holds the unweighted terms for logging.
    """

    def __init__(self, base_model: nn.Module, adapter_config: AdapterConfig) -> None:
        super().__init__()
        self.base_model = base_model
        self.adapter_config = adapter_config
        self.method = get_method(adapter_config.method)
        self.context = TaskContext()
        for p in base_model.parameters():
            p.requires_grad_(False)
        self.adapter_layers: dict[str, nn.Module] = self._inject()
        self._saved_module_names = self._unfreeze_modules_to_save()
        # Causal-LM loss from the hidden states of labelled positions only, in chunks (0 = the model's own loss).
        self.loss_chunk_size = 0
        self.last_aux_losses: dict[str, torch.Tensor] = {}  # the unweighted auxiliary losses of the last forward

    # --- injection --------------------------------------------------------------------------------
    def _inject(self) -> dict[str, nn.Module]:
        cfg, model = self.adapter_config, self.base_model
        if self.method.inject is not None:
            layers = self.method.inject(model, cfg, self.context)
        else:
            layers = {}
            for name in find_target_linears(model, cfg):
                layer = self.method.create_layer(model.get_submodule(name), cfg, self.context, name)
                set_submodule(model, name, layer)
                layers[name] = layer
        for layer in layers.values():
            for pname, p in layer.named_parameters():
                if not pname.startswith("base_layer."):
                    p.requires_grad_(True)
        return layers

    def _unfreeze_modules_to_save(self) -> list[str]:
        names = []
        for suffix in self.adapter_config.modules_to_save:
            hits = [n for n, _ in self.base_model.named_modules() if n == suffix or n.endswith("." + suffix)]
            if not hits:
                raise ConfigError(f"modules_to_save entry {suffix!r} matches no module of the base model")
            for n in hits:
                for p in self.base_model.get_submodule(n).parameters():
                    p.requires_grad_(True)
                names.append(n)
        return names

    # --- conveniences -------------------------------------------------------------------------------
    @property
    def config(self):
        """The base model's transformers config (so Trainer, generate and pipelines see what they expect)."""
        return self.base_model.config

    @property
    def tasks(self) -> list[str]:
        return self.adapter_config.tasks

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    @property
    def generation_config(self):
        return getattr(self.base_model, "generation_config", None)

    def get_input_embeddings(self) -> nn.Module:
        return self.base_model.get_input_embeddings()

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        """Turn on activation checkpointing in the base model (inputs require grad so adapters get gradients)."""
        kwargs.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
        self.base_model.gradient_checkpointing_enable(**kwargs)
        if hasattr(self.base_model, "enable_input_require_grads"):
            self.base_model.enable_input_require_grads()

    def compile(self, **kwargs: Any) -> MTModel:
        """``torch.compile`` the base model's decoder in place (the adapter layers compile with it, without graph
        breaks; the label-only loss head stays eager). Returns self."""
        target = self.base_model.get_decoder() if hasattr(self.base_model, "get_decoder") else self.base_model
        target.compile(**kwargs)
        return self

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Named parameters that train (adapters and modules_to_save)."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for _, p in self.trainable_parameters())

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameter count (the transformers signature, so Trainer's logging works)."""
        if only_trainable:
            return self.num_trainable_parameters()
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            embedding = self.base_model.get_input_embeddings()
            total -= sum(p.numel() for p in embedding.parameters()) if embedding is not None else 0
        return total

    def trainable_summary(self) -> str:
        """One line: trainable and total parameter counts."""
        t, a = self.num_trainable_parameters(), self.num_parameters()
        return f"trainable params: {t:,} || all params: {a:,} || trainable%: {100 * t / max(a, 1):.4f}"

    def describe(self) -> str:
        """Trainable-parameter summary plus the method's own description (e.g. ThanoRA's rank allocation)."""
        text = f"method: {self.method.name} | tasks: {len(self.tasks)} | {self.trainable_summary()}"
        if self.method.describe is not None:
            text += "\n" + self.method.describe(self)
        return text

    def param_groups(self, lr: float, weight_decay: float = 0.0, **kwargs: Any) -> list[dict[str, Any]]:
        """Optimizer parameter groups; methods with fast/slow weights give them their own learning rates."""
        if self.method.param_groups is not None:
            return self.method.param_groups(self, lr=lr, weight_decay=weight_decay, **kwargs)
        return [{"params": [p for _, p in self.trainable_parameters()], "lr": lr, "weight_decay": weight_decay}]

    def set_global_step(self, step: int) -> None:
        """Tell periodic regularizers which optimizer step is next (the trainer calls this)."""
        self.context.global_step = int(step)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # --- task ids -----------------------------------------------------------------------------------
    def task_index(self, task: int | str) -> int:
        """The id of a task given its name or id; errors name the task and the configured tasks."""
        tasks = self.adapter_config.tasks
        if isinstance(task, str):
            if task not in tasks:
                raise ValueError(f"unknown task {task!r}; configured tasks: {tasks}")
            return tasks.index(task)
        task = int(task)
        if not 0 <= task < len(tasks):
            raise ValueError(f"task id {task} is out of range; configured tasks (ids 0..{len(tasks) - 1}): {tasks}")
        return task

    def resolve_task_ids(self, task_ids: TaskIds, batch_size: int, device: torch.device | None = None,
                         *, training: bool = False) -> torch.Tensor | None:
        """Turn task ids in any accepted form into a validated LongTensor (batch,), or None if absent and allowed."""
        needed = self.method.task_ids_at_inference or (training and self.method.task_ids_in_training)
        tasks = self.adapter_config.tasks
        if task_ids is None:
            if needed:
                raise ValueError(f"method {self.method.name!r} needs task_ids (one per sample); "
                                 f"configured tasks: {tasks}")
            return None
        if not tasks:
            return None  # a task-agnostic adapter configured without tasks ignores ids
        if isinstance(task_ids, (int, str)):
            task_ids = [task_ids] * batch_size
        if isinstance(task_ids, torch.Tensor):
            ids = task_ids.reshape(-1).long()
            if ids.numel() == 1 and batch_size > 1:
                ids = ids.expand(batch_size)
            bad = ids[(ids < 0) | (ids >= len(tasks))]
            if bad.numel():
                raise ValueError(f"task id {int(bad[0])} is out of range; configured tasks "
                                 f"(ids 0..{len(tasks) - 1}): {tasks}")
        else:
            ids = torch.tensor([self.task_index(t) for t in task_ids], dtype=torch.long)
        if ids.shape[0] != batch_size:
            raise ValueError(f"task_ids has {ids.shape[0]} entries for a batch of {batch_size}")
        return ids.to(device if device is not None else self.device)

    def _set_context(self, task_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, collect: bool) -> None:
        self.context.task_ids = task_ids
        self.context.token_mask = attention_mask
        self.context.collect = collect

    # --- forward and generate -------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                task_ids: TaskIds = None, **kwargs: Any) -> Any:
        """Run the base model with this batch's task ids; adds weighted auxiliary losses to ``out.loss``."""
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if ref is None:
            raise ValueError("forward needs input_ids or inputs_embeds")
        ids = self.resolve_task_ids(task_ids, ref.shape[0], ref.device, training=self.training)
        collect = self.training and self.method.aux_losses is not None and torch.is_grad_enabled()
        self._set_context(ids, attention_mask, collect)
        if self.loss_chunk_size and kwargs.get("labels") is not None and self._can_chunk_loss():
            out = self._chunked_lm_loss(input_ids, attention_mask, **kwargs)
        else:
            out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        aux: dict[str, torch.Tensor] = {}
        if collect:
            weighted = self.method.aux_losses(self)
            total = None
            for name, (value, weight) in weighted.items():
                aux[name] = value.detach()
                if weight:
                    total = value * weight if total is None else total + value * weight
            if total is not None and getattr(out, "loss", None) is not None:
                out["loss"] = out.loss + total.to(out.loss.dtype)
            self._clear_caches()
        # Also kept on the model: wrappers (DistributedDataParallel) may rebuild the output without the attribute.
        self.last_aux_losses = aux
        with contextlib.suppress(AttributeError):  # a tuple output (return_dict=False) has no attributes
            out.aux_losses = aux
        return out

    def _can_chunk_loss(self) -> bool:
        base = self.base_model
        cfg = getattr(base, "config", None)
        return (type(base).__name__.endswith("ForCausalLM") and hasattr(base, "get_decoder")
                and base.get_output_embeddings() is not None
                and getattr(cfg, "final_logit_softcapping", None) is None
                and getattr(cfg, "logit_scale", None) is None)

    def _chunked_lm_loss(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                         labels: torch.Tensor, **kwargs: Any) -> Any:
        """The causal-LM loss computed from labelled positions only, chunk by chunk.

        Prompt tokens need no logits in supervised fine-tuning, and the full (batch, seq, vocab) logits
        tensor is what dominates memory: :func:`linear_cross_entropy` computes each chunk's logits, loss and
        gradient at once and keeps none of them. Equals the model's mean token cross-entropy (the summed one
        over ``num_items_in_batch`` when given); ``out.logits`` is None.
        """
        from transformers.modeling_outputs import CausalLMOutputWithPast

        num_items = kwargs.pop("num_items_in_batch", None)
        decoder_out = self.base_model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = decoder_out[0][:, :-1]
        targets = labels[:, 1:].to(hidden.device)
        keep = targets != -100
        hidden, targets = hidden[keep], targets[keep]
        head = self.base_model.get_output_embeddings()
        if isinstance(head, nn.Linear) and head.weight.dtype.is_floating_point:
            total = linear_cross_entropy(hidden, head.weight, head.bias, targets, self.loss_chunk_size)
        else:  # a head that is not a plain dense linear (a quantized one): its own forward, in one block
            total = nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")
        # ``num_items_in_batch`` (the transformers convention) replaces the local label count, e.g. by the
        # global count over the data-parallel processes divided by their number.
        denominator = num_items if num_items is not None else max(int(keep.sum()), 1)
        if torch.is_tensor(denominator):
            denominator = denominator.to(total.device)
        return CausalLMOutputWithPast(loss=total / denominator, logits=None)

    def _clear_caches(self) -> None:
        for layer in self.adapter_layers.values():
            clear = getattr(layer, "clear_cache", None)
            if callable(clear):
                clear()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 task_ids: TaskIds = None, **kwargs: Any) -> torch.Tensor:
        """``base_model.generate`` with per-row task ids (expanded for beams and multiple return sequences)."""
        batch = input_ids.shape[0] if input_ids is not None else kwargs["inputs_embeds"].shape[0]
        device = input_ids.device if input_ids is not None else kwargs["inputs_embeds"].device
        ids = self.resolve_task_ids(task_ids, batch, device)
        if ids is not None:
            expand = int(kwargs.get("num_beams", 1) or 1) * int(kwargs.get("num_return_sequences", 1) or 1)
            ids = ids.repeat_interleave(expand)
        self._set_context(ids, None, False)
        with fsdp_root_unsharded(self):
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    # --- method hooks ---------------------------------------------------------------------------------
    def calibrate(self, batches: Iterable[dict[str, Any]], **kwargs: Any) -> Any:
        """Method-specific data-dependent initialization (ThanoRA's rank allocation) from a few batches per task."""
        if self.method.calibrate is None:
            raise NotImplementedError(f"method {self.method.name!r} has no calibration step")
        return self.method.calibrate(self, batches, **kwargs)

    @property
    def needs_calibration(self) -> bool:
        return self.method.calibrate is not None

    def add_task(self, name: str, **kwargs: Any) -> int:
        """Add a new task (methods with task-indexed weights that support it); returns its id."""
        if self.method.add_task is None:
            raise NotImplementedError(f"method {self.method.name!r} cannot add tasks after creation")
        if name in self.adapter_config.tasks:
            raise ValueError(f"task {name!r} already exists; configured tasks: {self.adapter_config.tasks}")
        return self.method.add_task(self, name, **kwargs)

    # --- save / load ----------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter parameters and buffers (and modules_to_save), keyed by module path inside the base model."""
        state: dict[str, torch.Tensor] = {}
        for name, layer in self.adapter_layers.items():
            for key, value in layer.state_dict().items():
                if not key.startswith("base_layer."):
                    state[f"{name}.{key}" if name else key] = value
        for name in self._saved_module_names:
            for key, value in self.base_model.get_submodule(name).state_dict().items():
                state[f"{name}.{key}"] = value
        return state

    def save_pretrained(self, path: str | os.PathLike, metadata: dict[str, Any] | None = None,
                        state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Save the adapter (safetensors) and its config atomically into folder ``path``.

        ``state_dict`` replaces the model's own adapter tensors, e.g. whole tensors gathered from a sharded run.
        """
        source = self.adapter_state_dict() if state_dict is None else state_dict
        state = {k: v.detach().contiguous().cpu() for k, v in source.items()}
        for key, value in state.items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(f"refusing to save a non-finite adapter: {key} has NaN or inf values")
        record = {
            "adapter": self.adapter_config.to_dict(),
            "base_model": base_model_fingerprint(self.base_model),
            "mtpeft_version": _version(),
            **(metadata or {}),
        }

        def write(tmp: Path) -> None:
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(json.dumps(record, indent=2, sort_keys=True, default=str))

        return atomic_write_dir(path, write)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, path: str | os.PathLike, *, is_trainable: bool = False,
                        strict_base: bool = True) -> MTModel:
        """Load a saved adapter onto ``base_model``; refuses pickle files and adapters made for another base."""
        path = Path(path)
        config_file = path / CONFIG_NAME
        if not config_file.is_file():
            pickles = [p.name for p in path.glob("*") if p.suffix in _PICKLE_SUFFIXES] if path.is_dir() else []
            hint = f" (found pickle files {pickles}: mtpeft loads safetensors only)" if pickles else ""
            raise AdapterLoadError(f"{config_file} not found: not an mtpeft adapter folder{hint}")
        try:
            record = json.loads(config_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise AdapterLoadError(f"{config_file}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
        except (UnicodeDecodeError, RecursionError) as exc:
            raise AdapterLoadError(f"{config_file}: not a readable JSON file ({exc})") from exc
        if not isinstance(record, dict) or "adapter" not in record:
            raise AdapterLoadError(f"{config_file}: expected a JSON object with an 'adapter' key")
        if not isinstance(record.get("base_model", {}), dict):
            raise AdapterLoadError(f"{config_file}: 'base_model' must be an object (the base model's fingerprint)")
        try:
            adapter_config = config_from_dict(record["adapter"])
        except (ConfigError, TypeError) as exc:
            raise AdapterLoadError(f"{config_file}: {exc}") from exc
        if strict_base:
            _check_fingerprint(record.get("base_model", {}), base_model_fingerprint(base_model), config_file)
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise AdapterLoadError(f"{weights} not found (mtpeft stores adapters as safetensors only)")
        try:  # safetensors never unpickles: a pickle (or anything else) under this name fails to parse
            state = load_file(str(weights))
        except Exception as exc:
            raise AdapterLoadError(f"{weights}: not a valid safetensors file ({exc}); mtpeft loads safetensors "
                                   f"only and never unpickles weights") from exc
        try:
            model = cls(base_model, adapter_config)
        except ConfigError as exc:
            raise AdapterLoadError(f"{config_file}: the adapter does not fit this base model: {exc}") from exc
        model.load_adapter_state_dict(state, source=str(weights))
        if not is_trainable:
            model.eval()
            for _, p in model.trainable_parameters():
                p.requires_grad_(False)
        return model

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load adapter tensors; a missing key or a shape mismatch names the module and both shapes."""
        own = self.adapter_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if unexpected:
            raise AdapterLoadError(f"{source}: tensors for modules this base model does not have (or that this "
                                   f"method does not use): {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if missing:
            raise AdapterLoadError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        for key, value in state.items():
            if tuple(own[key].shape) != tuple(value.shape):
                module = key.rsplit(".", 1)[0]
                raise AdapterLoadError(
                    f"{source}: module {module!r} has shape {tuple(own[key].shape)} in this base model for "
                    f"{key.rsplit('.', 1)[-1]!r}, but the adapter has {tuple(value.shape)}: it was made for a "
                    f"different base model"
                )
        params = dict(self.base_model.named_parameters())
        buffers = dict(self.base_model.named_buffers())
        with torch.no_grad():
            for key, value in state.items():
                target = params.get(key, buffers.get(key))
                target.copy_(value.to(device=target.device, dtype=target.dtype))

    # --- merge and export ------------------------------------------------------------------------------
    def _linear_layers(self) -> dict[str, LinearAdapter]:
        return {n: m for n, m in self.adapter_layers.items() if isinstance(m, LinearAdapter)}

    @property
    def merge_kind(self) -> str:
        """'global', 'per_task' or 'none' for this adapter (``MethodSpec.merge_for`` may override it)."""
        spec = self.method
        return spec.merge_for(self.adapter_config) if spec.merge_for is not None else spec.merge

    def _merge_task(self, task: int | str | None) -> int | None:
        method = self.method
        kind = self.merge_kind
        if kind == "none":
            raise MergeError(method.merge_error or (
                f"method {method.name!r} routes each token between experts from its input, so no fixed "
                f"weight update equals it and it cannot be merged; use export_peft(path, task=..., rank=k, "
                f"calibration=batches) for an approximate per-task plain LoRA, or keep the adapter unmerged"
            ))
        if kind == "per_task" and task is None:
            raise MergeError(f"method {method.name!r} has one merged model per task: pass task=<one of "
                             f"{self.adapter_config.tasks}>")
        if task is None:
            return None
        return self.task_index(task)

    @torch.no_grad()
    def merge_and_unload(self, task: int | str | None = None) -> nn.Module:
        """Fold the task's update into the base weights and return the plain transformers model.

        The adapter layers are removed from the base model in place; keep a saved adapter if you need it again.
        """
        tid = self._merge_task(task)
        dequantized = False
        for name, layer in self._linear_layers().items():
            merged = layer.merged_weight(tid)
            if is_quantized(layer.base_layer):  # QLoRA: the merged model holds dequantized weights
                set_submodule(self.base_model, name, dense_linear(layer.base_layer, merged))
                dequantized = True
                continue
            layer.base_layer.weight.data.copy_(merged)
            set_submodule(self.base_model, name, layer.base_layer)
        self.adapter_layers = {}
        if dequantized:
            dequantize_rest(self.base_model)
        return self.base_model

    def export_peft(self, path: str | os.PathLike, task: int | str | None = None, *, rank: int | None = None,
                    calibration: Iterable[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Write a standard PEFT LoRA folder for ``task`` (adapter_config.json + adapter_model.safetensors).

        Mergeable methods export exactly. Input-routed methods need ``rank`` (and calibration batches for the
        routing statistics) and export an approximation; the returned report gives its relative error.
        """
        from .io.export import export_peft

        return export_peft(self, path, task=task, rank=rank, calibration=calibration)


# On CPU a block's (rows, vocab) fp32 logits stay under 16 MiB where the vocabulary allows: glibc malloc serves
# blocks of up to 32 MiB from its heap and reuses them, while each larger one is a fresh mmap whose pages fault
# and are zeroed on first touch (measured: 1016 x 8192 logits in one block made a tiny-Llama training step ~6%
# slower than blocks of 512 rows). At least 64 rows per block, so that each pass over the head weight is shared.
_CPU_BLOCK_ELEMENTS = 1 << 22
_CPU_MIN_BLOCK_ROWS = 64


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` whose gradients are computed in the forward pass.

    The loss is the last op of the graph, so its gradient is known up to the scalar ``grad_output`` while the
    logits are at hand: each chunk's logits become softmax minus one-hot in place and are multiplied back into
    gradients at once. No (tokens, vocab) tensor is kept for backward or recomputed; the log-softmax backward
    kernel and the zero-filled nll gradient of the plain path are skipped.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int, grad_enabled: bool) -> torch.Tensor:
        need_h, need_w, need_b = (grad_enabled and n for n in ctx.needs_input_grad[:3])
        need_any = need_h or need_w or need_b
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        if hidden.device.type == "cpu":  # see _CPU_BLOCK_ELEMENTS
            chunk = min(chunk, max(_CPU_MIN_BLOCK_ROWS, _CPU_BLOCK_ELEMENTS // weight.shape[0]))
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], targets[start:start + chunk]
            log_probs = torch.log_softmax(nn.functional.linear(h, weight, bias).float(), dim=-1)
            total -= log_probs.gather(1, y[:, None]).sum()
            if not need_any:
                continue
            dlogits = log_probs.exp_()  # softmax - onehot: d(summed loss) / d logits
            del log_probs
            dlogits[torch.arange(y.shape[0], device=y.device), y] -= 1
            dlogits = dlogits.to(hidden.dtype)
            if need_h:
                torch.mm(dlogits, weight, out=grad_h[start:start + chunk])
            if need_w:
                grad_w += (dlogits.t() @ h).float()
            if need_b:
                grad_b += dlogits.float().sum(0)
            del dlogits
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor):
        grad_h, grad_w, grad_b = (None if g is None else (g * grad_output).to(dtype)
                                  for g, dtype in zip(ctx.saved_tensors, ctx.dtypes))
        return grad_h, grad_w, grad_b, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")`` (fp32) in chunks of
    ``chunk`` rows, with its gradients computed in the forward pass (:class:`_LinearCrossEntropy`)."""
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, max(int(chunk), 1), torch.is_grad_enabled())


def _check_fingerprint(saved: dict[str, Any], current: dict[str, Any], source: Path) -> None:
    diffs = [f"{k}: adapter {saved[k]!r} vs base {current.get(k)!r}" for k in saved
             if k not in ("name_or_path", "class") and k in current and saved[k] != current[k]]
    if diffs:
        raise AdapterLoadError(f"{source}: the adapter was made for another base model "
                               f"({saved.get('name_or_path') or saved.get('class')}): " + "; ".join(diffs))


def _version() -> str:
    from . import __version__

    return __version__


def get_mt_model(base_model: nn.Module, config: AdapterConfig | dict[str, Any]) -> MTModel:
    """Inject the configured method's adapters into ``base_model`` (in place), freeze its weights, wrap it."""
    if isinstance(config, dict):
        config = config_from_dict(config)
    return MTModel(base_model, config)
