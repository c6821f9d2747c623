"""The parameter budget: count a method's trainable parameters without weights, and find the rank for a budget.

Counting builds the base model on the meta device from its config (no weights are loaded or allocated), so
a binary search over the rank costs a few model constructions, not a few models in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch

from ..errors import BenchError, ConfigError
from ..registry import config_from_dict


@lru_cache(maxsize=8)
def model_config(name: str, trust_remote_code: bool = False) -> Any:
    """The transformers config of the base model ``name`` (a built-in name or a path; cached)."""
    from transformers import AutoConfig

    from ..base_models import resolve_model_path

    return AutoConfig.from_pretrained(resolve_model_path(name), trust_remote_code=trust_remote_code)


def num_layers(config: Any) -> int:
    """The number of transformer layers of a transformers config (needed by ``top_layers``)."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise BenchError(f"cannot tell the number of layers of {type(config).__name__} (needed by top_layers)")


def count_trainable_parameters(
    model_name: str, method_cfg: dict[str, Any], tasks: list[str], trust_remote_code: bool = False
) -> int:
    """Trainable parameters of ``method_cfg`` on ``model_name`` (built on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    from ..model import get_mt_model

    adapter_cfg = config_from_dict({**method_cfg, "tasks": list(tasks)})  # validate before building anything
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(
            model_config(model_name, trust_remote_code), trust_remote_code=trust_remote_code
        )
    return get_mt_model(base, adapter_cfg).num_trainable_parameters()


def choose_rank(
    model_name: str,
    method_cfg: dict[str, Any],
    tasks: list[str],
    budget: int,
    *,
    max_rank: int = 1024,
    auto_alpha: bool = True,
    count: Callable[[dict[str, Any]], int] | None = None,
) -> tuple[int, int]:
    """The rank r whose trainable-parameter count comes closest to ``budget`` -> (r, parameters).

    Trainable parameters grow with r for every method, so a binary search finds the largest r within the
    budget; r + 1 is taken instead when it is closer. Ranks the method rejects (ThanoRA's r < number of tasks,
    MoE-LoRA's r < num_experts) are skipped; if even the smallest valid rank exceeds the budget it is used.
    """
    cache: dict[int, int | None] = {}

    def params(r: int) -> int | None:
        if r not in cache:
            cfg = {**method_cfg, "r": r}
            if auto_alpha:
                cfg["alpha"] = 2.0 * r
            try:
                cache[r] = count(cfg) if count is not None else count_trainable_parameters(model_name, cfg, tasks)
            except ConfigError:
                cache[r] = None
        return cache[r]

    lo = next((r for r in range(1, max_rank + 1) if params(r) is not None), None)
    if lo is None:
        raise BenchError(f"method {method_cfg.get('method')!r}: no rank in 1..{max_rank} gives a valid config")
    if params(lo) >= budget:  # type: ignore[operator]
        return lo, params(lo)  # type: ignore[return-value]
    hi = max_rank
    while params(hi) is None:
        hi -= 1
    if params(hi) <= budget:  # type: ignore[operator]
        return hi, params(hi)  # type: ignore[return-value]
    while hi - lo > 1:  # invariant: params(lo) <= budget < params(hi)
        mid = (lo + hi) // 2
        value = params(mid)
        if value is None or value <= budget:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda r: (abs(params(r) - budget), r))  # type: ignore[operator]
    return best, params(best)  # type: ignore[return-value]
