"""``mtpeft eval RUN_DIR``: evaluate a trained run per task; prints the table and saves metrics and predictions."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..runs import load_run
from .options import add_quiet_option


def add_parser(subparsers: Any) -> None:
    """Add the ``eval`` subcommand."""
    p = subparsers.add_parser("eval", help="Evaluate a trained run per task.",
                              description="Evaluate the run's adapter on its tasks' eval splits; prints and saves "
                              "a table.")
    p.add_argument("run_dir", help="A run folder written by `mtpeft train`.")
    p.add_argument("--tasks", help="Comma-separated subset of the run's tasks.")
    p.add_argument("--batch-size", type=int, default=None, help="Evaluation batch size (default: the run's).")
    p.add_argument("--out", help="Where to save metrics and predictions (default: RUN_DIR/eval).")
    add_quiet_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate the run's model on its tasks (or the ``--tasks`` subset) and save the result."""
    from ..data.resolve import resolve_task_specs
    from ..data.tasks import load_tasks
    from ..evaluation import evaluate

    cfg, tokenizer, model = load_run(args.run_dir)
    specs = resolve_task_specs(cfg)
    if args.tasks:
        wanted = [t.strip() for t in args.tasks.split(",") if t.strip()]
        unknown = [t for t in wanted if t not in [s.name for s in specs]]
        if unknown:
            raise UsageError(f"unknown task(s) {unknown}; this run's tasks: {[s.name for s in specs]}")
        specs = [s for s in specs if s.name in wanted]
    tasks = load_tasks(specs, cfg.data.root)
    result = evaluate(model, tokenizer, [(d.spec, d.eval) for d in tasks if d.eval], model.tasks,
                      batch_size=args.batch_size or cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                      progress=not args.quiet)
    out = Path(args.out) if args.out else Path(args.run_dir) / "eval"
    result.save(out)
    print(result.format_table())
    print(f"\nsaved to {out}")
    return 0
