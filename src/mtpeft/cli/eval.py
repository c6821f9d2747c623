"""``mtpeft eval RUN_DIR``: evaluate a trained run per task; prints the table and saves metrics and predictions.

``mtpeft eval --model NAME CONFIG_OR_TASKS`` scores the bare model (no adapter, no training) on a run config's
tasks or on task presets, and saves the scores before training as ``eval/before.json|md`` in the run folder.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..runs import load_run
from .checks import check_remote_code
from .options import add_quiet_option, add_trust_remote_code_option


def add_parser(subparsers: Any) -> None:
    """Add the ``eval`` subcommand."""
    p = subparsers.add_parser("eval", help="Evaluate a trained run per task.",
                              description="Evaluate the run's adapter on its tasks' eval splits; prints and saves "
                              "a table. With --model: the bare model on a run config's tasks (or task presets), "
                              "saved as OUTPUT_DIR/eval/before.json and before.md.")
    p.add_argument("run_dir", help="A run folder written by `mtpeft train`; with --model, a run config YAML or "
                   "task presets (e.g. 'demo:arithmetic,reverse' or 'bbh27').")
    p.add_argument("--model", help="Score this base model (name or path) without an adapter, before any training.")
    p.add_argument("--tasks", help="Comma-separated subset of the run's tasks.")
    p.add_argument("--batch-size", type=int, default=None, help="Evaluation batch size (default: the run's).")
    p.add_argument("--out", help="Where to save metrics and predictions (default: RUN_DIR/eval; with --model the "
                   "config's output_dir/eval).")
    add_quiet_option(p)
    add_trust_remote_code_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate the run's model on its tasks (or the ``--tasks`` subset) and save the result."""
    from ..data.resolve import resolve_task_specs
    from ..data.tasks import load_tasks
    from ..evaluation import evaluate

    if args.model:
        return _run_bare_model(args)
    check_remote_code(args.run_dir, args.trust_remote_code)
    cfg, tokenizer, model = load_run(args.run_dir)
    specs = _selected(resolve_task_specs(cfg), args.tasks)
    tasks = load_tasks(specs, cfg.data.root)
    result = evaluate(model, tokenizer, [(d.spec, d.eval) for d in tasks if d.eval], model.tasks,
                      batch_size=args.batch_size or cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                      progress=not args.quiet)
    out = Path(args.out) if args.out else Path(args.run_dir) / "eval"
    result.save(out)
    print(result.format_table())
    print(f"\nsaved to {out}")
    return 0


def _selected(specs: list[Any], tasks: str | None) -> list[Any]:
    """The specs named in the comma-separated ``--tasks`` (all without it)."""
    if not tasks:
        return specs
    wanted = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in [s.name for s in specs]]
    if unknown:
        raise UsageError(f"unknown task(s) {unknown}; this run's tasks: {[s.name for s in specs]}")
    return [s for s in specs if s.name in wanted]


def _bare_model_config(model: str, config_or_tasks: str, trust_remote_code: bool) -> Any:
    """The run config to score ``model`` with: the YAML file's (its model replaced), else defaults over the presets.
    The model's own code runs only with ``--trust-remote-code``, whatever the file says."""
    from ..training.run_config import load_run_config, run_config_from_dict

    path = Path(config_or_tasks)
    if path.is_file():
        cfg = load_run_config(path)
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=model,
                                                                  trust_remote_code=trust_remote_code))
    if path.suffix in (".yaml", ".yml"):
        raise UsageError(f"run config {path} not found")
    out = Path("runs") / f"eval-{Path(model).name or 'model'}"
    return run_config_from_dict({"tasks": [config_or_tasks], "output_dir": str(out),
                                 "model": {"name": model, "trust_remote_code": trust_remote_code}})


def _run_bare_model(args: argparse.Namespace) -> int:
    """``--model``: the base model without adapters on the tasks; saves ``before.json|md`` and the predictions."""
    import torch

    from ..base_models import load_run_base_model, load_tokenizer
    from ..bench.scoring import FixedTaskIds
    from ..data.collator import use_chat_template
    from ..data.resolve import resolve_task_specs
    from ..data.tasks import load_tasks
    from ..evaluation import evaluate

    cfg = _bare_model_config(args.model, args.run_dir, args.trust_remote_code)
    specs = _selected(resolve_task_specs(cfg), args.tasks)
    tasks = load_tasks(specs, cfg.data.root)
    tokenizer = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    use_chat_template(tokenizer, cfg.data.chat_template)
    base = load_run_base_model(cfg.model)
    if cfg.model.quantization is None:  # a quantized model was placed on load and cannot move
        base.to(cfg.train.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = evaluate(FixedTaskIds(base, drop=True), tokenizer, [(d.spec, d.eval) for d in tasks if d.eval],
                      [s.name for s in specs], batch_size=args.batch_size or cfg.eval.batch_size,
                      max_new_tokens=cfg.eval.max_new_tokens, progress=not args.quiet)
    out = Path(args.out) if args.out else Path(cfg.output_dir) / "eval"
    result.save(out, name="before")
    print(result.format_table())
    print(f"\nsaved to {out / 'before.json'} and {out / 'before.md'}")
    return 0
