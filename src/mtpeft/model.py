"""MTModel: adapter injection, task-id plumbing, auxiliary losses and merge (save/load in :mod:`mtpeft.io.adapter`,
exports in :mod:`mtpeft.io.export`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import AdapterConfig
from .core.context import TaskContext
from .core.distributed import fsdp_root_unsharded
from .core.layers import AdapterLayer, LinearAdapter
from .core.loss import can_chunk_loss, chunked_causal_lm_loss
from .core.packed import packed_inputs
from .core.quant import dense_linear, dequantize_rest, is_quantized, keep_standard_4bit_layout
from .core.targets import find_target_linears, set_submodule
from .core.wrapping import DelegatingModule
from .errors import AdapterLoadError, ConfigError, MergeError
from .io.adapter import CONFIG_NAME, check_adapter_state, read_adapter, save_adapter
from .io.module_state import adapter_module_state, load_module_state
from .registry import config_from_dict, get_method

TaskIds = torch.Tensor | Sequence[int] | Sequence[str] | int | str | None


class MTModel(DelegatingModule):
    """A Hugging Face model with multi-task adapters injected in place and the base frozen.

    Use :func:`get_mt_model` to build one and :meth:`from_pretrained` to load a saved adapter.
    ``forward`` and ``generate`` take ``task_ids`` per sample (a LongTensor, a list of ids or task names, or
    one id/name for the whole batch). ``out.loss`` is the model loss plus the method's weighted auxiliary
    losses (in training mode); ``out.aux_losses`` holds the unweighted terms for logging. Unknown attributes
    fall through to the base model.
    """

    delegate_to = "base_model"

    def __init__(self, base_model: nn.Module, adapter_config: AdapterConfig) -> None:
        super().__init__()
        self.base_model = base_model
        self.adapter_config = adapter_config
        self.method = get_method(adapter_config.method)
        self.context = TaskContext()
        for p in base_model.parameters():
            p.requires_grad_(False)
        keep_standard_4bit_layout(base_model)  # bitsandbytes' CPU inference layout has no autograd
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
        """Turn task ids in any accepted form into a validated LongTensor (batch,), or None if absent and allowed;
        a (batch, seq) tensor stays per token (packed rows), a (batch, 1) column is one id per sample."""
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
            ids = task_ids.long() if task_ids.dim() == 2 and task_ids.shape[1] > 1 else task_ids.reshape(-1).long()
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

    # --- forward and generate -------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                task_ids: TaskIds = None, labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        """Run the base model with this batch's task ids; adds weighted auxiliary losses to ``out.loss``. The
        columns are named so that transformers.Trainer keeps them and finds ``labels`` (for ``eval_loss``). Packed
        rows (:mod:`mtpeft.data.packing`): ``segment_ids`` (batch, seq; -1 on padding), no ``attention_mask``."""
        named = {"labels": labels, "position_ids": position_ids, "token_type_ids": token_type_ids}
        kwargs.update({k: v for k, v in named.items() if v is not None})
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if ref is None:
            raise ValueError("forward needs input_ids or inputs_embeds")
        ids = self.resolve_task_ids(task_ids, ref.shape[0], ref.device, training=self.training)
        if segment_ids is not None:
            packed_inputs(segment_ids, attention_mask, kwargs)
        collect = self.training and self.method.aux_losses is not None and torch.is_grad_enabled()
        self.context.set_batch(ids, attention_mask, collect, segment_ids)
        if self.loss_chunk_size and kwargs.get("labels") is not None and can_chunk_loss(self.base_model):
            # the loss from labelled positions only, in chunks, without the (batch, seq, vocab) logits
            out = chunked_causal_lm_loss(self.base_model, input_ids, attention_mask, chunk=self.loss_chunk_size,
                                         **kwargs)
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

    def _clear_caches(self) -> None:
        for layer in self.adapter_layers.values():
            if isinstance(layer, AdapterLayer):
                layer.clear_cache()

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
        self.context.set_batch(ids, None, False)
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
        """Save the adapter (safetensors) and its config atomically into folder ``path``; ``state_dict`` replaces
        the model's own adapter tensors, e.g. whole tensors gathered from a sharded run."""
        state = self.adapter_state_dict() if state_dict is None else state_dict
        return save_adapter(path, state, self.adapter_config, self.base_model, metadata)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, path: str | os.PathLike, *, is_trainable: bool = False,
                        strict_base: bool = True) -> MTModel:
        """Load a saved adapter onto ``base_model``; refuses pickle files and adapters made for another base."""
        adapter_config, state, weights = read_adapter(path, base_model, strict_base=strict_base)
        try:
            model = cls(base_model, adapter_config)
        except ConfigError as exc:
            source = Path(path) / CONFIG_NAME
            raise AdapterLoadError(f"{source}: the adapter does not fit this base model: {exc}") from exc
        model.load_adapter_state_dict(state, source=str(weights))
        if not is_trainable:
            model.eval()
            for _, p in model.trainable_parameters():
                p.requires_grad_(False)
        return model

    # The adapter only, not the frozen base: what transformers.Trainer checkpoints and resumes (io/module_state).
    state_dict = adapter_module_state
    load_state_dict = load_module_state

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load adapter tensors; a missing key or a shape mismatch names the module and both shapes."""
        check_adapter_state(self.adapter_state_dict(), state, source)
        targets = dict(self.base_model.named_parameters(remove_duplicate=False)) | dict(self.base_model.named_buffers())
        with torch.no_grad():
            for key, value in state.items():
                target = targets[key]
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
        """The validated task id of a merge or exact export (None: the global one)."""
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

    def lora_factors(self, task: int | str | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The exact plain-LoRA factors ``{module: (A, B)}`` (scale folded into B, detached) of every adapted
        linear for ``task``: what a merge adds and a PEFT export writes. A MergeError for a method that does
        not merge, or a per-task one without ``task``."""
        tid = self._merge_task(task)
        layers = self._linear_layers()
        return {name: tuple(f.detach() for f in layer.lora_factors(tid)) for name, layer in layers.items()}

    @torch.no_grad()
    def merge_and_unload(self, task: int | str | None = None) -> nn.Module:
        """Fold the task's update into the base weights and return the plain transformers model. The adapter
        layers are removed from the base model in place; keep a saved adapter if you need it again."""
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
        """Write a standard PEFT LoRA folder for ``task`` (:func:`mtpeft.io.export.export_peft`): exact for mergeable
        methods; input-routed ones need ``rank`` and calibration batches and export an approximation."""
        from .io.export import export_peft

        return export_peft(self, path, task=task, rank=rank, calibration=calibration)


def get_mt_model(base_model: nn.Module, config: AdapterConfig | dict[str, Any]) -> MTModel:
    """Inject the configured method's adapters into ``base_model`` (in place), freeze its weights, wrap it."""
    if isinstance(config, dict):
        config = config_from_dict(config)
    return MTModel(base_model, config)
