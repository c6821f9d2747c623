"""Adapter configs, the method registry and `config_from_dict`.

Every method has a dataclass config that derives from :class:`AdapterConfig` (PEFT style: each field
carries its help text in ``metadata["help"]``) and registers a :class:`MethodSpec` under its name.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import numbers
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from .model import MTModel


def task_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a task name, or None. Task names become folder names (``out/peft/<task>``
    exports, per-task files), so they cannot hold a path separator or NUL, nor start with '.' ('..')."""
    if "/" in name or "\\" in name:
        return "holds a path separator ('/' or '\\'); task names become folder names"
    if "\x00" in name:
        return "holds a NUL character; task names become folder names"
    if name.startswith("."):
        return "starts with '.' (a hidden or parent folder); task names become folder names"
    return None


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the annotated type (ints pass as floats; numpy scalars count as numbers)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    args = typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint in (list, tuple) or origin in (list, tuple):
        return isinstance(value, (list, tuple)) and (not args or all(_fits(v, args[0]) for v in value))
    if hint is dict or origin is dict:
        return isinstance(value, dict) and (not args or all(_fits(k, args[0]) and _fits(v, args[1])
                                                            for k, v in value.items()))
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if isinstance(hint, type) and hint is not typing.Any:
        return isinstance(value, hint)
    return True  # an annotation this check does not know: the method's own validation decides


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class AdapterConfig:
    """Fields every method shares. Subclasses add their own and set ``method``."""

    method: ClassVar[str] = ""

    tasks: list[str] = _help(
        "Task names, in task-id order. `task_ids` passed to forward/generate index this list.",
        default_factory=list,
    )
    r: int = _help("Adapter rank (for ThanoRA: the total rank shared out among the tasks).", default=8)
    alpha: float = _help("Scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rslora).",
                         default=16.0)
    dropout: float = _help("Dropout on the adapter input.", default=0.0)
    target_modules: str | list[str] = _help(
        "Which linear modules get an adapter: 'all-linear' (every nn.Linear except the output head), a list of "
        "module names matched as dotted suffixes (e.g. ['q_proj', 'v_proj']), or a regular expression matched "
        "against the full module name.",
        default="all-linear",
    )
    exclude_modules: list[str] = _help("Module-name suffixes never to adapt.", default_factory=list)
    layers_to_transform: list[int] | None = _help(
        "Only adapt modules inside these transformer-layer indices (as PEFT); null = every layer. Adapting only "
        "the top layers also stops backward early, which makes CPU training much cheaper.",
        default=None,
    )
    use_rslora: bool = _help("Rank-stabilized scaling alpha/sqrt(r) instead of alpha/r.", default=False)
    init: str = _help("Initialization of the down-projection A: 'kaiming' (uniform, a=sqrt(5), as PEFT) or "
                      "'gaussian' (normal, std 1/r). B starts at zero, so the adapted model starts equal to the base.",
                      default="kaiming")
    modules_to_save: list[str] = _help(
        "Base modules (name suffixes) to train fully and save with the adapter, e.g. a classifier head.",
        default_factory=list,
    )

    def __post_init__(self) -> None:
        self.validate()

    # --- validation -------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field; raises ConfigError naming the field."""
        if isinstance(self.tasks, str):
            raise ConfigError(f"{type(self).__name__}.tasks must be a list of task names, got the string "
                              f"{self.tasks!r}")
        hints = _field_types(type(self))
        for f in dataclasses.fields(self):  # every field's type first (values from YAML/JSON can be anything)
            value = getattr(self, f.name)
            if not (_fits(value, list) if f.name == "tasks" else _fits(value, hints[f.name])):
                hint = hints[f.name]
                wanted = hint.__name__ if isinstance(hint, type) else str(hint)
                raise ConfigError(f"{type(self).__name__}.{f.name} must be {wanted}, got {type(value).__name__} "
                                  f"{value!r}")
        self.tasks = list(self.tasks)
        for i, name in enumerate(self.tasks):
            if not isinstance(name, str) or not name.strip():
                raise ConfigError(f"{type(self).__name__}.tasks[{i}] is empty or not a string: {name!r}")
            problem = task_name_problem(name)
            if problem:
                raise ConfigError(f"{type(self).__name__}.tasks[{i}] = {name!r} {problem}")
        duplicates = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if duplicates:
            raise ConfigError(f"{type(self).__name__}.tasks has duplicate task names: {duplicates}")
        if self.requires_tasks() and not self.tasks:
            raise ConfigError(f"method {self.method!r} needs the list of tasks: set `tasks` to a non-empty list")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"{type(self).__name__}.r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ConfigError(f"{type(self).__name__}.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{type(self).__name__}.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("kaiming", "gaussian"):
            raise ConfigError(f"{type(self).__name__}.init must be one of ['kaiming', 'gaussian'], got {self.init!r}")
        if not isinstance(self.target_modules, (str, list, tuple)) or not self.target_modules:
            raise ConfigError(f"{type(self).__name__}.target_modules must be 'all-linear', a non-empty list of "
                              f"module names or a regex, got {self.target_modules!r}")

    def requires_tasks(self) -> bool:
        """Whether this method cannot work without a task list (task-indexed weights or losses)."""
        return False

    @property
    def scale(self) -> float:
        """The update's scaling factor s."""
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    # --- serialization ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict including the method name."""
        out = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Build the config from a dict; unknown keys are an error that lists the known ones."""
        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise ConfigError(f"config is for method {method!r}, not {cls.method!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} for method {cls.method!r}; known keys: {sorted(known)}")
        return cls(**data)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class MethodSpec:
    """How a method plugs into the engine. One per file under ``methods/``.

    - ``create_layer(base_linear, config, module_name, context)`` returns the adapter layer wrapping one linear;
      methods that adapt something other than single linears (blocks, prompts) give ``inject`` instead.
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
    aux_losses: Callable[[MTModel], dict[str, tuple[Any, float]]] | None = None
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
        raise ValueError(f"{spec.config_class.__name__}.method is {spec.config_class.method!r}, expected {spec.name!r}")
    if spec.merge not in ("global", "per_task", "none"):
        raise ValueError(f"merge must be 'global', 'per_task' or 'none', got {spec.merge!r}")
    if (spec.create_layer is None) == (spec.inject is None):
        raise ValueError(f"method {spec.name!r} must give exactly one of create_layer and inject")
    _REGISTRY[spec.name] = spec
    return spec


def _ensure_builtin_methods() -> None:
    from . import methods  # noqa: F401  (importing registers the built-in methods)


def get_method(name: str) -> MethodSpec:
    """The registered method of that name; an unknown name lists the available ones."""
    _ensure_builtin_methods()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; available methods: {available_methods()}")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    _ensure_builtin_methods()
    return sorted(_REGISTRY)


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Build a method config from a dict with a ``method`` key (as saved in ``mtpeft_config.json``)."""
    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError(f"an adapter config needs a 'method' key (one of {available_methods()})")
    return get_method(data["method"]).config_class.from_dict(data)
