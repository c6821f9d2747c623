"""Saving and loading an adapter folder: ``mtpeft_config.json`` (the method config, the base model's
fingerprint, the mtpeft version) and ``adapter_model.safetensors``, written atomically; loading refuses pickle
files and adapters made for another base model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import AdapterConfig
from ..errors import AdapterLoadError, ConfigError
from ..registry import config_from_dict
from .atomic import atomic_write_dir

CONFIG_NAME = "mtpeft_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def base_model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies the base model an adapter was made for."""
    cfg = getattr(model, "config", None)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size",
            "num_attention_heads", "num_key_value_heads")
    out = {k: getattr(cfg, k) for k in keys if cfg is not None and getattr(cfg, k, None) is not None}
    out["class"] = type(model).__name__
    out["name_or_path"] = getattr(cfg, "_name_or_path", "") if cfg is not None else ""
    return out


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], source: Path) -> None:
    """Refuse (AdapterLoadError naming ``source``) an adapter whose base model differs from ``current``."""
    diffs = [f"{k}: adapter {saved[k]!r} vs base {current.get(k)!r}" for k in saved
             if k not in ("name_or_path", "class") and k in current and saved[k] != current[k]]
    if diffs:
        raise AdapterLoadError(f"{source}: the adapter was made for another base model "
                               f"({saved.get('name_or_path') or saved.get('class')}): " + "; ".join(diffs))


def mtpeft_version() -> str:
    """The installed mtpeft version, recorded in every saved adapter."""
    from .. import __version__

    return __version__


def save_adapter(path: str | os.PathLike, state: dict[str, torch.Tensor], adapter_config: AdapterConfig,
                 base_model: nn.Module, metadata: dict[str, Any] | None = None) -> Path:
    """Write the adapter tensors ``state`` and its config atomically into folder ``path``; refuses NaN or inf."""
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"refusing to save a non-finite adapter: {key} has NaN or inf values")
    record = {
        "adapter": adapter_config.to_dict(),
        "base_model": base_model_fingerprint(base_model),
        "mtpeft_version": mtpeft_version(),
        **(metadata or {}),
    }

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(record, indent=2, sort_keys=True, default=str))

    return atomic_write_dir(path, write)


def read_adapter(path: str | os.PathLike, base_model: nn.Module, *, strict_base: bool = True
                 ) -> tuple[AdapterConfig, dict[str, torch.Tensor], Path]:
    """``(adapter config, tensors, weights file)`` of the adapter folder ``path``, checked against
    ``base_model`` (unless ``strict_base`` is False); every problem is an AdapterLoadError naming the file."""
    path = Path(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        pickles = [p.name for p in path.glob("*") if p.suffix in PICKLE_SUFFIXES] if path.is_dir() else []
        hint = f" (found pickle files {pickles}: mtpeft loads safetensors only)" if pickles else ""
        raise AdapterLoadError(f"{config_file} not found: not an mtpeft adapter folder{hint}")
    try:
        record = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AdapterLoadError(f"{config_file}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    except (UnicodeDecodeError, RecursionError) as exc:
        raise AdapterLoadError(f"{config_file}: not a readable JSON file ({exc})") from exc
    if not isinstance(record, dict) or "adapter" not in record:
        raise AdapterLoadError(f"{config_file}: expected a JSON object with an 'adapter' key")
    if not isinstance(record.get("base_model", {}), dict):
        raise AdapterLoadError(f"{config_file}: 'base_model' must be an object (the base model's fingerprint)")
    try:
        adapter_config = config_from_dict(record["adapter"])
    except (ConfigError, TypeError) as exc:
        raise AdapterLoadError(f"{config_file}: {exc}") from exc
    if strict_base:
        check_fingerprint(record.get("base_model", {}), base_model_fingerprint(base_model), config_file)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterLoadError(f"{weights} not found (mtpeft stores adapters as safetensors only)")
    try:  # safetensors never unpickles: a pickle (or anything else) under this name fails to parse
        state = load_file(str(weights))
    except Exception as exc:
        raise AdapterLoadError(f"{weights}: not a valid safetensors file ({exc}); mtpeft loads safetensors "
                               f"only and never unpickles weights") from exc
    for key, value in state.items():  # saving refuses these; a file edited or damaged later still has them
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise AdapterLoadError(f"{weights}: tensor {key!r} holds NaN or inf values; the adapter is damaged "
                                   f"(retrain, or load an earlier checkpoint)")
    return adapter_config, state, weights


def check_adapter_state(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse tensors ``state`` that do not match the model's own adapter tensors ``own`` one to one: a missing
    or unexpected key, or a shape mismatch, names the module and both shapes."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise AdapterLoadError(f"{source}: tensors for modules this base model does not have (or that this "
                               f"method does not use): {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if missing:
        raise AdapterLoadError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for key, value in state.items():
        if tuple(own[key].shape) != tuple(value.shape):
            module = key.rsplit(".", 1)[0]
            raise AdapterLoadError(
                f"{source}: module {module!r} has shape {tuple(own[key].shape)} in this base model for "
                f"{key.rsplit('.', 1)[-1]!r}, but the adapter has {tuple(value.shape)}: it was made for a "
                f"different base model"
            )
