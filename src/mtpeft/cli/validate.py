"""``mtpeft validate CONFIG``: check a run config, its tasks and its method config without running anything."""

from __future__ import annotations

import argparse
from typing import Any

from .options import add_set_option


def add_parser(subparsers: Any) -> None:
    """Add the ``validate`` subcommand."""
    p = subparsers.add_parser("validate", help="Check a run config without running it.",
                              description="Validate a run config and its tasks; errors name the key and allowed "
                              "values.")
    p.add_argument("config", help="YAML run config.")
    add_set_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load and resolve everything a run would; print one summary line."""
    from ..data.resolve import resolve_task_specs
    from ..training.run_config import load_run_config, method_config_for
    from .checks import check_data_files, check_model_path

    cfg = load_run_config(args.config, args.set)
    specs = resolve_task_specs(cfg)
    method_config_for(cfg, [s.name for s in specs])
    model = check_model_path(cfg.model.name)
    files = check_data_files(specs, cfg.data.root)
    print(f"{args.config}: valid. method={cfg.method['method']} tasks={len(specs)} steps={cfg.train.steps} "
          f"output_dir={cfg.output_dir} model={model} data files found={files}")
    return 0
