"""Each method's bench configuration: :data:`BENCH_COMMON` plus the few :data:`METHOD_DEFAULTS` that are not dataclass
defaults."""

from __future__ import annotations

import copy
from typing import Any

from ..registry import get_method

#: What every method gets in the bench: the same rank (8; ``alpha = 2 r`` is added by the runner) and the same
#: adapter dropout, a protocol choice that keeps methods comparable. Everything else is the method's own
#: dataclass defaults, so ``mtpeft train`` and ``mtpeft bench`` give the same method (mtLoRA's two routing
#: groups, Align-LoRA's MMD 0.01 and the rest live in the configs); ``--set methods.<name>.<key>=value``
#: changes one method's key.
BENCH_COMMON: dict[str, Any] = {"r": 8, "dropout": 0.05}

#: Per-method bench settings beyond :data:`BENCH_COMMON`: only what is not a dataclass default.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    # ta_lora: nothing beyond BENCH_COMMON (prompt_length 10, slow_lr_scale 0.1 are its dataclass defaults)
}


def method_defaults(method: str) -> dict[str, Any]:
    """A copy of the method's default config (``{"method": name, ...}``); unknown names list the methods."""
    if method in ("single_task_lora", "peft_lora"):
        method = "lora"
    get_method(method)  # unknown -> ConfigError listing the methods
    return {"method": method, **copy.deepcopy(BENCH_COMMON), **copy.deepcopy(METHOD_DEFAULTS.get(method, {}))}


def resolve_auto(method_cfg: dict[str, Any], model_config: Any) -> None:
    """Replace bench-only ``auto`` values that depend on the base model. None are left: mtLoRA's
    ``routing_group_size: auto`` (two routing groups at any width) is resolved by the config itself, per
    adapted block, so it stays ``auto`` here and in the run's saved config."""
    del method_cfg, model_config
