"""Wrapping whole submodules: attribute fall-through to the wrapped module, the block-wrapper base class, and
finding a model's transformer layers (for the methods that adapt blocks or attention modules)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .layers import AdapterLayer


class DelegatingModule(nn.Module):
    """A module whose unknown attributes fall through to the module it wraps, named by ``delegate_to``.

    So code that reads the wrapped module's attributes (``self_attn.layer_idx``, a model's ``config`` keys)
    keeps working on the wrapper.
    """

    delegate_to = "base_layer"

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == self.delegate_to:
                raise
            return getattr(getattr(self, self.delegate_to), name)


class ModuleWrapper(DelegatingModule, AdapterLayer):
    """Base of the adapters that replace a whole submodule (kept as ``base_layer``) and add to its output.

    A whole block has no single weight to fold an update into: ``export_kind`` is 'none' unless a subclass
    says how (mtLoRA's block adapters fit one onto the block's output linear).
    """

    export_kind = "none"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer

    @staticmethod
    def first_input(args: tuple, kwargs: dict) -> torch.Tensor:
        """The hidden states a block was called with (positional or the ``hidden_states`` keyword)."""
        if args:
            return args[0]
        if "hidden_states" in kwargs:
            return kwargs["hidden_states"]
        if "x" in kwargs:
            return kwargs["x"]
        raise ValueError("could not find the block input (no positional argument and no `hidden_states=`)")

    @staticmethod
    def add_to_output(out: Any, delta: torch.Tensor) -> Any:
        """out + delta, or (out[0] + delta, *rest) for modules returning a tuple (attention)."""
        if isinstance(out, tuple):
            return (out[0] + delta.to(out[0].dtype), *out[1:])
        return out + delta.to(out.dtype)


def transformer_layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, module, style) of every transformer layer: 'decoder' (children ``self_attn`` / ``mlp``) or
    'encoder' (BERT-style children ``attention``, ``intermediate``, ``output``), in model order."""
    found = []
    for name, module in model.named_modules():
        children = dict(module.named_children())
        if "self_attn" in children or "mlp" in children:
            found.append((name, module, "decoder"))
        elif {"attention", "intermediate", "output"} <= set(children):
            found.append((name, module, "encoder"))
    return found
