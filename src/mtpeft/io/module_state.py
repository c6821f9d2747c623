"""An MTModel's ``state_dict`` / ``load_state_dict``: the adapter's tensors only.

``transformers.Trainer`` saves a model that is no ``PreTrainedModel`` (or ``PeftModel``) as ``model.state_dict()``
in ``model.safetensors`` and resumes it with ``model.load_state_dict(state, strict=False)``. The frozen base is no
part of what trains, so an MTModel's state dict is its adapter (and modules_to_save): checkpoints stay small and
a base with tied embeddings saves no tensor twice (safetensors refuses shared tensors). ``load_state_dict`` takes
that adapter state, or a whole-model state dict (``base_model.state_dict()`` keys under ``base_model.``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

#: The prefix of the adapter keys: where the adapted base model sits inside an MTModel.
BASE_PREFIX = "base_model."


def adapter_module_state(model: nn.Module, destination: dict[str, Any] | None = None, prefix: str = "",
                         keep_vars: bool = False) -> dict[str, Any]:
    """``model.adapter_state_dict()`` keyed by path inside ``model`` (``prefix`` + ``base_model.`` + key), the
    way ``nn.Module.state_dict`` fills ``destination``; ``keep_vars`` gives the parameters themselves."""
    out: dict[str, Any] = destination if destination is not None else OrderedDict()
    own = dict(model.base_model.named_parameters()) | dict(model.base_model.named_buffers()) if keep_vars else {}
    for key, value in model.adapter_state_dict().items():
        out[f"{prefix}{BASE_PREFIX}{key}"] = own.get(key, value)
    return out


def load_module_state(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True,
                      assign: bool = False) -> _IncompatibleKeys:
    """Load ``state``: the adapter state of :func:`adapter_module_state` (every adapter tensor, checked one to one
    with names and shapes), or else a whole-model state dict through ``nn.Module.load_state_dict``."""
    adapter_keys = set(adapter_module_state(model))
    if state and set(state) <= adapter_keys:
        model.load_adapter_state_dict({k[len(BASE_PREFIX):]: v for k, v in state.items()},
                                      source="state dict (adapter)")
        return _IncompatibleKeys([], [])
    return nn.Module.load_state_dict(model, state, strict=strict, assign=assign)
