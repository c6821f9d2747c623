"""The base adapter config and task-name rules.

Every method has a dataclass config that derives from :class:`AdapterConfig` (PEFT style: each field
carries its help text in ``metadata["help"]``) and registers a :class:`~mtpeft.registry.MethodSpec` under its
name (:mod:`mtpeft.registry`, which also has ``config_from_dict``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ConfigError
from .validation import field_type_problem, task_name_problem


def help_field(text: str, **kwargs: Any) -> Any:
    """A dataclass field with its help text (``metadata["help"]``, as PEFT's configs); ``kwargs`` go to
    ``dataclasses.field`` (``default=...`` or ``default_factory=...``)."""
    return field(metadata={"help": text}, **kwargs)


@dataclass
class AdapterConfig:
    """Fields every method shares. Subclasses add their own and set ``method``."""

    method: ClassVar[str] = ""
    #: Named sets of published hyperparameters (``{"paper": {...}, "released": {...}}``): the ``preset`` key of
    #: :meth:`from_dict` starts from one, and explicit keys override it.
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: The allowed ``init`` values (a method with its own initialization adds to them).
    init_choices: ClassVar[tuple[str, ...]] = ("kaiming", "gaussian")

    tasks: list[str] = help_field(
        "Task names, in task-id order. `task_ids` passed to forward/generate index this list.",
        default_factory=list,
    )
    r: int = help_field("Adapter rank (for ThanoRA: the total rank shared out among the tasks).", default=8)
    alpha: float = help_field("Scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rslora).",
                              default=16.0)
    dropout: float = help_field("Dropout on the adapter input.", default=0.0)
    target_modules: str | list[str] = help_field(
        "Which linear modules get an adapter: 'all-linear' (every nn.Linear except the output head), a list of "
        "module names matched as dotted suffixes (e.g. ['q_proj', 'v_proj']), or a regular expression matched "
        "against the full module name.",
        default="all-linear",
    )
    exclude_modules: list[str] = help_field("Module-name suffixes never to adapt.", default_factory=list)
    layers_to_transform: list[int] | None = help_field(
        "Only adapt modules inside these transformer-layer indices (as PEFT); null = every layer. Adapting only "
        "the top layers also stops backward early, which makes CPU training much cheaper.",
        default=None,
    )
    use_rslora: bool = help_field("Rank-stabilized scaling alpha/sqrt(r) instead of alpha/r.", default=False)
    init: str = help_field("Initialization of the down-projection A: 'kaiming' (uniform, a=sqrt(5), as PEFT) or "
                           "'gaussian' (normal, std 1/r). B starts at zero, so the adapted model starts equal to the "
                           "base.", default="kaiming")
    modules_to_save: list[str] = help_field(
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
        # every field's type first (values from YAML/JSON can be anything); task names are checked one by one below
        problem = field_type_problem(self, items_checked_later=("tasks",))
        if problem:
            raise ConfigError(f"{type(self).__name__}.{problem}")
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
        self.check_positive_int("r")
        self.check_min("alpha", 0, strict=True)
        self.check("dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)")
        self.check_choice("init", self.init_choices)
        self.check("target_modules", isinstance(self.target_modules, (str, list, tuple)) and bool(self.target_modules),
                   "'all-linear', a non-empty list of module names or a regex")

    # --- the checks subclasses' validate() use: each raises "<Config>.<key> must be <wanted>, got <value>" ----
    def check(self, key: str, ok: bool, wanted: str) -> None:
        """Raise ConfigError ``<Config>.<key> must be <wanted>, got <value>`` unless ``ok``."""
        if not ok:
            raise ConfigError(f"{type(self).__name__}.{key} must be {wanted}, got {getattr(self, key)!r}")

    def check_choice(self, key: str, allowed: tuple[str, ...]) -> None:
        """Field ``key`` is one of ``allowed``."""
        self.check(key, getattr(self, key) in allowed, f"one of {list(allowed)}")

    def check_positive_int(self, key: str, *, optional: bool = False) -> None:
        """Field ``key`` is an integer >= 1 (or None, when ``optional``)."""
        value = getattr(self, key)
        ok = (optional and value is None) or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
        self.check(key, ok, f"{'None or ' if optional else ''}a positive integer")

    def check_min(self, key: str, bound: float, *, strict: bool = False) -> None:
        """Field ``key`` is >= ``bound`` (> with ``strict``) and finite; NaN and inf never are."""
        value = getattr(self, key)
        self.check(key, (value > bound if strict else value >= bound) and value != float("inf"),
                   f"{'>' if strict else '>='} {bound:g} and finite")

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
        """Build the config from a dict; unknown keys are an error that lists the known ones. A ``preset`` key
        (one of :attr:`presets`) starts from that preset's values; the dict's other keys override them."""
        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise ConfigError(f"config is for method {method!r}, not {cls.method!r}")
        if "preset" in data:
            data = {**cls.preset_values(data.pop("preset")), **data}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} for method {cls.method!r}; known keys: {sorted(known)}")
        return cls(**data)

    @classmethod
    def preset_values(cls, name: Any) -> dict[str, Any]:
        """A copy of preset ``name``'s values; an unknown name is an error that lists the allowed ones."""
        if not isinstance(name, str) or name not in cls.presets:
            allowed = sorted(cls.presets) or "none: this method has no presets"
            raise ConfigError(f"unknown preset {name!r} for method {cls.method!r}; allowed presets: {allowed}")
        return json.loads(json.dumps(cls.presets[name]))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> AdapterConfig:
        """The config of preset ``name`` with ``overrides`` on top (``MtLoRAConfig.from_preset("paper")``)."""
        return cls(**{**cls.preset_values(name), **overrides})

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
