"""``mtpeft train CONFIG``: train a run config; prints the per-task table and where the run folder is."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import UsageError
from .options import add_overwrite_option, add_set_option


def add_parser(subparsers: Any) -> None:
    """Add the ``train`` subcommand."""
    p = subparsers.add_parser("train", help="Train a run config.", description="Train the tasks and method of a "
                              "YAML run config; writes checkpoints, the adapter, metrics and per-task evaluation to "
                              "output_dir.")
    p.add_argument("config", help="YAML run config (see examples/).")
    add_set_option(p)
    p.add_argument("--resume", action="store_true", help="Continue from the latest checkpoint in output_dir.")
    add_overwrite_option(p, "output_dir")
    p.add_argument("--quiet", action="store_true", help="No training progress bar and no model-loading bars; an "
                   "evaluation still shows one progress line (long evaluations do not look stuck).")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's choice).")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train; only the main process prints the result."""
    from ..training.run_config import load_run_config
    from ..training.trainer import train
    from .checks import check_model_path

    if args.resume and args.overwrite:
        raise UsageError("--resume continues a run and --overwrite starts it again: give one of them")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    cfg = load_run_config(args.config, args.set)
    check_model_path(cfg.model.name)
    result = train(cfg, resume=args.resume, overwrite=args.overwrite, progress="eval" if args.quiet else True)
    if result.is_main_process:
        _print_result(result)
    return 0


def _print_result(result: Any) -> None:
    if result.eval_before is not None and result.eval is not None:
        from ..evaluation import compare_table

        print(compare_table(result.eval_before, result.eval))
    elif result.eval is not None:
        print(result.eval.format_table())
    print(f"\nrun folder: {result.output_dir}\n  adapter: {result.output_dir / 'adapter'}\n"
          f"  metrics log: {result.output_dir / 'metrics.jsonl'}\n  evaluation: {result.output_dir / 'eval'}")
