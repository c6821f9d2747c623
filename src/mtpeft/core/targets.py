"""Target matching: which linear modules of a model get adapters, and replacing a submodule by name.

A "linear" is an ``nn.Linear`` (bitsandbytes' 4-/8-bit linears derive from it) or a transformers ``Conv1D`` (the
GPT-2 family's projections: the same map with the weight stored transposed, d_in x d_out, as PEFT's
``fan_in_fan_out``).
"""

from __future__ import annotations

import re

from torch import nn

from ..config import AdapterConfig
from ..errors import ConfigError


def _output_head_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {n for n, m in model.named_modules() if head is not None and m is head}


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers ``Conv1D`` (y = x W + b with W stored d_in x d_out). Matched by class
    name and shape so that target matching does not import transformers."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(weight, nn.Parameter)
            and weight.dim() == 2)


def is_linear(module: nn.Module) -> bool:
    """Whether an adapter can wrap ``module`` as a linear: an ``nn.Linear`` or a transformers ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of every linear in ``model`` (``nn.Linear`` and transformers ``Conv1D``)."""
    return [n for n, m in model.named_modules() if is_linear(m)]


def find_target_linears(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Resolve ``config.target_modules`` to full linear-module names; clear errors when nothing matches."""
    linears = linear_module_names(model)
    leaf_names = sorted({n.rsplit(".", 1)[-1] for n in linears})
    excluded = _output_head_names(model)

    def is_excluded(name: str) -> bool:
        return any(name == e or name.endswith("." + e) for e in config.exclude_modules)

    targets = config.target_modules
    if targets == "all-linear":
        chosen = [n for n in linears if n not in excluded]
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as exc:
            raise ConfigError(f"target_modules {targets!r} is not 'all-linear' nor a valid regex: {exc}") from exc
        chosen = [n for n in linears if pattern.fullmatch(n)]
    else:
        chosen = []
        for t in targets:
            hits = [n for n in linears if n == t or n.endswith("." + t)]
            if not hits:
                raise ConfigError(
                    f"target module {t!r} matches no linear module of {type(model).__name__}; "
                    f"its linear modules are named {leaf_names}"
                )
            chosen.extend(h for h in hits if h not in chosen)
        chosen = [n for n in linears if n in set(chosen)]
    chosen = [n for n in chosen if not is_excluded(n)]
    if config.layers_to_transform is not None:
        wanted = {int(i) for i in config.layers_to_transform}
        chosen = [n for n in chosen if layer_index(n) in wanted]
    if not chosen:
        raise ConfigError(
            f"target_modules {targets!r} selects no linear module of {type(model).__name__}; "
            f"its linear modules are named {leaf_names}"
        )
    check_rank_fits(model, chosen, config.r)
    return chosen


def check_rank_fits(model: nn.Module, names: list[str], r: int) -> None:
    """Refuse a rank ``r`` above min(d_in, d_out) of a targeted linear: the update could not use the extra rank,
    and a rank-r SVD or orthogonal start of such a layer does not exist. The error names the layer and its shape."""
    for name in names:
        layer = model.get_submodule(name)
        d_in, d_out = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
        if not isinstance(d_out, int) and is_conv1d(layer):  # a Conv1D stores its weight d_in x d_out
            d_in, d_out = layer.weight.shape
        if isinstance(d_in, int) and isinstance(d_out, int) and r > min(d_in, d_out):
            raise ConfigError(f"r={r} is larger than min(d_in, d_out) = {min(d_in, d_out)} of target layer "
                              f"{name!r} (in_features={d_in}, out_features={d_out}); lower r, or leave that layer "
                              f"out with exclude_modules or target_modules")


_LAYER_INDEX = re.compile(r"\.(?:layers|layer|h|blocks)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The transformer-layer index in a module name ('model.layers.3.mlp.up_proj' -> 3), or None."""
    match = _LAYER_INDEX.search("." + name + ".")
    return int(match.group(1)) if match else None


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
