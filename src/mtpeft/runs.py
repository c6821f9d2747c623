"""Open a finished (or interrupted) run folder: its run config, tokenizer and trained :class:`MTModel`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from .errors import RunFolderError

RUN_CONFIG_NAME = "run_config.yaml"


def load_run(run_dir: str | os.PathLike, *, trust_remote_code: bool | None = None) -> tuple[Any, Any, Any]:
    """``(run_config, tokenizer, model)`` of a run folder: the final adapter, else the latest checkpoint's.

    ``trust_remote_code``: None honours the run config's ``model.trust_remote_code``; False refuses a run whose
    config asks for it (the CLI passes False unless ``--trust-remote-code`` is given: opening someone else's run
    folder must not run its model's code); True allows it.

    Raises :class:`~mtpeft.errors.RunFolderError` naming the folder when it is not a run folder or holds
    no adapter yet, or when it asks for remote code that ``trust_remote_code=False`` refuses.
    """
    from .base_models import load_run_base_model, load_tokenizer
    from .data.collator import use_chat_template
    from .model import MTModel
    from .training.checkpoint import checkpoint_dirs
    from .training.run_config import load_run_config

    run = Path(run_dir)
    cfg_file = run / RUN_CONFIG_NAME
    if not cfg_file.is_file():
        raise RunFolderError(f"{cfg_file} not found: {run} is not an mtpeft run folder")
    cfg = load_run_config(cfg_file)
    if cfg.model.trust_remote_code and trust_remote_code is False:
        raise RunFolderError(f"{cfg_file} sets model.trust_remote_code: true (the model {cfg.model.name!r} would run "
                             f"its own code); pass --trust-remote-code if you trust it")
    adapter = run / "adapter"
    if not adapter.is_dir():
        ckpts = checkpoint_dirs(run)
        if not ckpts:
            raise RunFolderError(f"{run} has neither a final adapter nor a checkpoint")
        adapter = ckpts[-1] / "adapter"
        print(f"note: no final adapter; using the latest checkpoint {adapter}", file=sys.stderr)
    tokenizer = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    use_chat_template(tokenizer, cfg.data.chat_template)
    base = load_run_base_model(cfg.model)
    return cfg, tokenizer, MTModel.from_pretrained(base, adapter)
