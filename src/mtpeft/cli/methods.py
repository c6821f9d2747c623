"""``mtpeft methods``: the registered methods, one line each, with their merge kind and task-id needs."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> None:
    """Add the ``methods`` subcommand."""
    p = subparsers.add_parser("methods", help="List the available methods.", description="List registered methods.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print one line per registered method."""
    from ..registry import available_methods, get_method

    for name in available_methods():
        spec = get_method(name)
        print(f"{name:14s} merge={spec.merge:9s} task ids at inference={'yes' if spec.task_ids_at_inference else 'no '}"
              f"  {spec.description}"
              + (f" Presets: {', '.join(sorted(spec.config_class.presets))}." if spec.config_class.presets else ""))
    return 0
