"""Each method's bench configuration: :data:`METHOD_DEFAULTS` and the ``auto`` values resolved per model."""

from __future__ import annotations

import copy
from typing import Any

from ..registry import get_method

#: Sensible per-method defaults (rank 8 everywhere; alpha = 2 r is added by the runner). Chosen from the
#: papers' and the examples' settings; ``--set methods.<name>.<key>=value`` changes one method's key.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"r": 8, "dropout": 0.05},
    # MMD, not the KL default: the KL estimates each task's variances from the 1-2 samples a task has in a mixed
    # batch, and in the quick BBH setting it reached 1e4-1e5 and swamped the LM loss; the MMD is bounded
    "align_lora": {"r": 8, "dropout": 0.05, "align_loss": "mmd", "align_weight": 0.01},
    # r is raised to the number of tasks when smaller (ThanoRA needs >= 1 rank per task)
    "thanora": {
        "r": 8,
        "dropout": 0.05,
        "complexity": "activations",
        "block_init": "data",
        "ortho_weight": 0.01,
    },
    # routing_group_size 'auto' = hidden_size / 2 (two routing groups, as the paper's 2048 of 4096)
    "mtlora": {
        "r": 8,
        "dropout": 0.05,
        "num_experts": 16,
        "block_type": "ffn",
        "routing_group_size": "auto",
        "spectral_mode": "released",
        "spectral_weight": 1.0,
        "balance_weight": 0.01,
    },
    "hydralora": {"r": 8, "dropout": 0.05, "num_experts": 4, "balance_weight": 0.0},
    "mtl_lora": {"r": 8, "dropout": 0.05, "num_up_projections": 3, "temperature": 0.1},
    "moe_lora": {"r": 8, "dropout": 0.05, "num_experts": 4, "gating": "task"},
    "ta_lora": {"r": 8, "dropout": 0.05, "prompt_length": 10, "slow_lr_scale": 0.1},
}


def method_defaults(method: str) -> dict[str, Any]:
    """A copy of the method's default config (``{"method": name, ...}``); unknown names list the methods."""
    if method == "single_task_lora":
        method = "lora"
    get_method(method)  # unknown -> ConfigError listing the methods
    return {"method": method, **copy.deepcopy(METHOD_DEFAULTS.get(method, {"r": 8}))}


def resolve_auto(method_cfg: dict[str, Any], model_config: Any) -> None:
    """Replace ``auto`` values that depend on the base model (mtLoRA's ``routing_group_size``: hidden / 2)."""
    if method_cfg.get("routing_group_size") == "auto":
        hidden = int(getattr(model_config, "hidden_size", 0) or 0)
        method_cfg["routing_group_size"] = hidden // 2 if hidden and hidden % 2 == 0 else None
