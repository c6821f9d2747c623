"""``mtpeft demo``: the embedded default run (SmolLM2-135M-Instruct on the built-in tasks)."""

from __future__ import annotations

import argparse
from typing import Any

from .options import add_quiet_option, add_set_option


def add_parser(subparsers: Any) -> None:
    """Add the ``demo`` subcommand."""
    p = subparsers.add_parser("demo", help="Train a multi-task method on SmolLM2 and the built-in task suite.",
                              description="The embedded default: SmolLM2-135M-Instruct on four generated tasks; "
                              "prints the per-task table before and after training, saves the adapter and a PEFT "
                              "export.")
    p.add_argument("--method", default="mtl_lora", help="Method to train (see `mtpeft methods`).")
    p.add_argument("--steps", type=int, default=None, help="Optimizer steps (default: the demo's).")
    p.add_argument("--output-dir", default="runs/demo", help="Run folder.")
    add_set_option(p)
    add_quiet_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train, evaluate and export the demo run (it prints its own tables and next steps)."""
    from ..training.demo import run_demo

    run_demo(method=args.method, steps=args.steps, output_dir=args.output_dir, overrides=args.set,
             progress=not args.quiet)
    return 0
