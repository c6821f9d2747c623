"""Checks the commands make before they load anything: do the model path and the data files exist?

Nothing here touches the network: a model name that is not a local path is a Hugging Face hub name, reported as
not checked offline.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import RunConfigError, RunFolderError

#: A Hugging Face hub repository id: ``name`` or ``owner/name``.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def check_model_path(name: str) -> str:
    """``'local'`` or ``'hub name, not checked offline'`` for ``model.name``.

    Raises:
        RunConfigError: a local-looking path that does not exist, or a folder without a model config.
    """
    from ..base_models import SMOLLM2_ALIASES

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RunConfigError(f"model.name {name!r}: the folder {path} holds no config.json (not a transformers "
                                 f"model folder)")
        return "local"
    if path.exists():
        raise RunConfigError(f"model.name {name!r}: {path} is a file; give the model's folder")
    if name in SMOLLM2_ALIASES or (_HUB_ID.fullmatch(name) and ".." not in name and "--" not in name):
        return "hub name, not checked offline"
    raise RunConfigError(f"model.name {name!r}: no such folder (and not a Hugging Face hub name such as "
                         f"'owner/model')")


def check_data_files(specs: list[Any], data_root: str | None) -> int:
    """How many local data files the tasks read; raises FileNotFoundError naming a missing one (hub datasets and
    built-in sources are not checked)."""
    from ..data.sources import resolve_source

    found = 0
    for spec in specs:
        for source in {spec.source, getattr(spec, "eval_source", None)} - {None}:
            found += resolve_source(source, data_root) is not None
    return found


def check_remote_code(run_dir: str, allowed: bool) -> None:
    """Refuse a run folder whose run_config.yaml sets ``model.trust_remote_code: true`` unless ``allowed``
    (``--trust-remote-code``): opening someone else's run folder must not run its model's code. A missing or
    unreadable config is left to :func:`~mtpeft.runs.load_run` to report."""
    import yaml

    cfg_file = Path(run_dir) / "run_config.yaml"
    try:
        data = yaml.safe_load(cfg_file.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return
    model = data.get("model") if isinstance(data, dict) else None
    if isinstance(model, dict) and model.get("trust_remote_code") is True and not allowed:
        raise RunFolderError(f"{cfg_file} sets model.trust_remote_code: true (the model {model.get('name')!r} would "
                             f"run its own code); pass --trust-remote-code if you trust it")
