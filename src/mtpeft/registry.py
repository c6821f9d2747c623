"""Methods by name: each method file registers a :class:`MethodSpec` (its config class, how it plugs into the
model, its declared capabilities), and :func:`config_from_dict` builds a method's config by name.

Importing :mod:`mtpeft` imports :mod:`mtpeft.methods`, which registers the built-in methods; this module
imports no method, so that methods can import it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import AdapterConfig
from .errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

MERGE_KINDS = ("global", "per_task", "none")


@dataclass(frozen=True)
class MethodSpec:
    """How a method plugs into the engine. One per file under ``methods/``.

    - ``create_layer(base_linear, config, module_name, context)`` returns the adapter layer wrapping one linear;
      methods that adapt something other than single linears (blocks, prompts) give ``inject`` instead. Every
      layer derives from :class:`mtpeft.core.layers.AdapterLayer` and declares its capabilities there.
    - ``aux_losses(model)`` returns ``{name: (value, weight)}`` from what the layers cached in the last forward.
    - ``param_groups(model, lr, weight_decay, **kw)``, ``calibrate(model, batches, **kw)`` and
      ``add_task(model, name, **kw)``, ``describe(model) -> str`` are optional hooks behind the MTModel
      methods of the same names.
    - ``merge``: 'global' (one merge for all tasks), 'per_task' or 'none' (input-routed; approximate export only).
    - ``merge_for(config) -> str``: optional; when the merge class depends on the config (MoE-LoRA's task vs
      token gating) it overrides ``merge`` for that config. ``MTModel.merge_kind`` gives the effective value.
    - ``merge_error``: optional explanation used in the MergeError of a method that cannot merge (e.g. prompt-
      based TA-LoRA); the default text is about input-dependent routing.
    - ``task_ids_at_inference``: whether forward/generate need task ids outside training.
    """

    name: str
    config_class: type[AdapterConfig]
    create_layer: Callable[..., nn.Module] | None = None
    inject: Callable[[nn.Module, AdapterConfig, Any], dict[str, nn.Module]] | None = None
    aux_losses: Callable[[Any], dict[str, tuple[Any, float]]] | None = None
    param_groups: Callable[..., list[dict[str, Any]]] | None = None
    calibrate: Callable[..., Any] | None = None
    add_task: Callable[..., int] | None = None
    describe: Callable[..., str] | None = None
    merge: str = "global"
    merge_for: Callable[[AdapterConfig], str] | None = None
    merge_error: str = ""
    task_ids_at_inference: bool = False
    task_ids_in_training: bool = False
    description: str = ""


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Register a method under ``spec.name`` (its config class must have the same ``method``)."""
    if spec.config_class.method != spec.name:
        raise ConfigError(f"{spec.config_class.__name__}.method is {spec.config_class.method!r}, "
                          f"expected {spec.name!r}")
    if spec.merge not in MERGE_KINDS:
        raise ConfigError(f"merge must be 'global', 'per_task' or 'none', got {spec.merge!r}")
    if (spec.create_layer is None) == (spec.inject is None):
        raise ConfigError(f"method {spec.name!r} must give exactly one of create_layer and inject")
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """The registered method of that name; an unknown name lists the available ones."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; available methods: {available_methods()}")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_REGISTRY)


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Build a method config from a dict with a ``method`` key (as saved in ``mtpeft_config.json``)."""
    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError(f"an adapter config needs a 'method' key (one of {available_methods()})")
    return get_method(data["method"]).config_class.from_dict(data)
