"""The adapter layer base classes and the capabilities they declare.

Every module an :class:`~mtpeft.model.MTModel` injects derives from :class:`AdapterLayer`: either a
:class:`LinearAdapter`, which wraps one frozen ``nn.Linear`` (kept as ``base_layer``) and adds a
method-specific update, or a :class:`~mtpeft.core.wrapping.ModuleWrapper` around a whole sub-block. The model,
the exports and the diagnostics read the declared capabilities instead of probing a layer for attributes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .context import TaskContext
from .lowrank import adapter_dtype
from .quant import dense_weight
from .targets import is_conv1d

if TYPE_CHECKING:
    from ..config import AdapterConfig

EXPORT_KINDS = ("exact", "routed", "block", "none")


class Observers:
    """Callbacks a layer calls with what it computed in a forward (for diagnostics and export statistics).

    ``add(fn)`` returns a handle whose ``remove()`` takes the callback off again, as torch's module hooks do.
    """

    def __init__(self) -> None:
        self.callbacks: OrderedDict[int, Callable[..., None]] = OrderedDict()  # a dict a handle can weakref

    def add(self, fn: Callable[..., None]) -> RemovableHandle:
        """Call ``fn(*values)`` on every report until the returned handle is removed."""
        handle = RemovableHandle(self.callbacks)
        self.callbacks[handle.id] = fn
        return handle

    def __call__(self, *values: Any) -> None:
        for fn in list(self.callbacks.values()):
            fn(*values)

    def __bool__(self) -> bool:
        return bool(self.callbacks)


class AdapterLayer(nn.Module):
    """Base of every adapter module, with the capabilities it declares (class attributes; a layer whose
    capabilities follow its config sets them per instance):

    - ``export_kind``: how its update becomes plain LoRA factors. ``'exact'``: ``lora_factors(task)`` gives
      them (merging and PEFT export are exact); ``'routed'``: the update for fixed routing weights,
      ``expected_delta_weight(mean_pi)``, with ``routing_weights(x)`` (..., G, E), ``num_groups``,
      ``num_experts`` and ``adapter_output(x)`` (an approximate export from the mean routing); ``'block'``: a
      path around a whole block, fitted onto the block's output linear (``output_linear()``,
      ``out_linear_name``, ``add_delta_observer(fn)``); ``'none'``: no plain-LoRA form at all (prompts).
    - ``routed``: it routes each token between experts and reports the routing weights to routing observers
      (:class:`~mtpeft.core.routing.RoutedExpertsMixin`).
    - ``task_gated``: it mixes its experts by one fixed gate per task, ``task_gate(task_ids)`` (k, E).
    - ``prompted``: it holds learned per-task prompts, ``task_prompts(task_ids)`` (k, length, d).
    - ``task_blocks``: its rank rows are split into one block per task: rows ``rank_offsets[t]`` to
      ``rank_offsets[t + 1]`` of ``lora_A`` belong to task t.
    """

    export_kind: str = "exact"
    routed: bool = False
    task_gated: bool = False
    prompted: bool = False
    task_blocks: bool = False

    def clear_cache(self) -> None:
        """Forget what the last training forward cached for the auxiliary losses (nothing here)."""


class LinearAdapter(AdapterLayer):
    """Base of the adapter layers that wrap one linear.

    ``base_layer`` is an ``nn.Linear`` (or a bitsandbytes one) or a transformers ``Conv1D`` (``fan_in_fan_out``).
    Subclasses implement ``adapter_output(x)`` (the scaled update, any shape ``(..., d_out)``) and
    ``lora_factors(task)`` returning ``(A, B)`` with ``B @ A`` equal to the task's weight update, the scale
    folded into B. ``delta_weight``, merging and PEFT export are derived from ``lora_factors``.
    """

    def __init__(self, base_layer: nn.Linear, config: AdapterConfig, context: TaskContext, name: str = "") -> None:
        super().__init__()
        self.base_layer = base_layer
        # A transformers Conv1D (GPT-2) stores its weight d_in x d_out: the adapter works on the transposed,
        # nn.Linear-shaped weight and transposes back where it writes the base layer (PEFT's fan_in_fan_out).
        self.fan_in_fan_out = is_conv1d(base_layer)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features = base_layer.in_features
            self.out_features = base_layer.out_features
        self.scale = config.scale
        self.module_name = name
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # A plain attribute, not a submodule: the context is shared by every layer and holds no parameters.
        self.context = context
        self.merged = False

    @property
    def factory_kwargs(self) -> dict:
        weight = self.base_layer.weight
        return {"device": weight.device, "dtype": adapter_dtype(weight)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        return out + self.adapter_output(x).to(out.dtype)

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def lora_factors(self, task: int | None) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def delta_weight(self, task: int | None = None) -> torch.Tensor:
        """The weight update (d_out x d_in) that this adapter adds for ``task``."""
        return self.delta_from_factors(*self.lora_factors(task))

    def delta_from_factors(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The weight update that a PEFT LoRA export of factors (A, B with the scale folded in) gives this layer:
        B A here; a layer whose export carries more than the factors (DoRA's magnitude) overrides it."""
        return b @ a

    def base_weight(self) -> torch.Tensor:
        """The base layer's dense weight as d_out x d_in (nn.Linear's layout; a Conv1D weight transposed, a 4-/8-bit
        weight dequantized)."""
        w = dense_weight(self.base_layer)
        return w.t() if self.fan_in_fan_out else w

    def merged_weight(self, task: int | None = None) -> torch.Tensor:
        """Base weight plus this task's update, computed in fp32 and cast to the base dtype (a 4-/8-bit base
        weight is dequantized first, and the result stays in its dequantized dtype), in the base layer's own
        layout (d_in x d_out for a Conv1D), ready to be copied into its weight."""
        w = self.base_weight()
        delta = self.delta_weight(task)
        merged = (w.to(delta.dtype) + delta).to(w.dtype)
        return merged.t() if self.fan_in_fan_out else merged

    def peft_extras(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """What a PEFT LoRA export of this layer needs beside its factors: ``LoraConfig`` options
        (``fan_in_fan_out`` over a Conv1D) and tensors keyed by their PEFT name inside the module."""
        return ({"fan_in_fan_out": True} if self.fan_in_fan_out else {}), {}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, scale={self.scale:g}"


def peft_export_extras(layers: dict[str, nn.Module], names: Iterable[str]) -> tuple[dict[str, Any],
                                                                                    dict[str, torch.Tensor]]:
    """The ``LoraConfig`` options and extra tensors (``<module>.<peft name>``) of the exported modules ``names``:
    ``fan_in_fan_out`` when any is a Conv1D (PEFT sets it per module from the module's type), ``use_dora`` and
    DoRA's ``lora_magnitude_vector``."""
    options: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name in names:
        layer = layers.get(name)
        if not isinstance(layer, LinearAdapter):
            continue
        layer_options, layer_tensors = layer.peft_extras()
        options.update(layer_options)
        tensors.update({f"{name}.{key}": value for key, value in layer_tensors.items()})
    return options, tensors
