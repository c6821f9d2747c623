"""Command line: ``mtpeft train | eval | export | predict | validate | demo | bench | analyze | methods``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..runs import load_run

SET_HELP = "Override a run-config key, e.g. --set train.lr=1e-4 --set method.r=16 (repeatable)."


def cmd_validate(args: argparse.Namespace) -> int:
    from ..training.run_config import load_run_config
    from ..training.trainer import method_config_for, resolve_task_specs

    cfg = load_run_config(args.config, args.set)
    specs = resolve_task_specs(cfg)
    method_config_for(cfg, [s.name for s in specs])
    print(f"{args.config}: valid. method={cfg.method['method']} tasks={len(specs)} steps={cfg.train.steps} "
          f"output_dir={cfg.output_dir}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..training.run_config import load_run_config
    from ..training.trainer import train

    cfg = load_run_config(args.config, args.set)
    result = train(cfg, resume=args.resume, progress=not args.quiet)
    if result.is_main_process:
        _print_result(result)
    return 0


def _print_result(result: Any) -> None:
    if result.eval_before is not None and result.eval is not None:
        from ..evaluation.evaluator import compare_table

        print(compare_table(result.eval_before, result.eval))
    elif result.eval is not None:
        print(result.eval.format_table())
    print(f"\nrun folder: {result.output_dir}\n  adapter: {result.output_dir / 'adapter'}\n"
          f"  metrics log: {result.output_dir / 'metrics.jsonl'}\n  evaluation: {result.output_dir / 'eval'}")


def cmd_eval(args: argparse.Namespace) -> int:
    from ..evaluation.evaluator import evaluate
    from ..training.trainer import load_tasks, resolve_task_specs

    cfg, tokenizer, model = load_run(args.run_dir)
    specs = resolve_task_specs(cfg)
    if args.tasks:
        wanted = [t.strip() for t in args.tasks.split(",") if t.strip()]
        unknown = [t for t in wanted if t not in [s.name for s in specs]]
        if unknown:
            raise SystemExit(f"error: unknown task(s) {unknown}; this run's tasks: {[s.name for s in specs]}")
        specs = [s for s in specs if s.name in wanted]
    tasks = load_tasks(specs, cfg.data.root)
    result = evaluate(model, tokenizer, [(s, d.eval) for s, d in tasks if d.eval], model.tasks,
                      batch_size=args.batch_size or cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                      progress=not args.quiet)
    out = Path(args.out) if args.out else Path(args.run_dir) / "eval"
    result.save(out)
    print(result.format_table())
    print(f"\nsaved to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    cfg, tokenizer, model = load_run(args.run_dir)
    out = Path(args.out)
    if args.format == "peft":
        report = model.export_peft(out, task=args.task, rank=args.rank)
        tokenizer.save_pretrained(out)
        print(json.dumps(report, indent=2, default=str))
        print(f"\nPEFT LoRA written to {out}: load with peft.PeftModel.from_pretrained(base, '{out}'), "
              f"or serve with vLLM --enable-lora --lora-modules {args.task or 'adapter'}={out}")
    else:
        merged = model.merge_and_unload(task=args.task)
        merged.save_pretrained(out)
        tokenizer.save_pretrained(out)
        print(f"merged model written to {out} (a plain transformers model)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from ..data.collator import encode_prompts, eos_token_id

    cfg, tokenizer, model = load_run(args.run_dir)
    model.eval()
    task_id = model.task_index(args.task) if model.tasks else None
    batch = encode_prompts(tokenizer, args.text, max_length=cfg.data.max_length)
    ids = None if task_id is None else torch.full((len(args.text),), task_id)
    eos = eos_token_id(tokenizer)
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], task_ids=ids,
                         max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=eos,
                         pad_token_id=tokenizer.pad_token_id)
    for text, row in zip(args.text, out[:, batch["input_ids"].shape[1]:]):
        row = row.tolist()
        row = row[:row.index(eos)] if eos in row else row
        print(f"{text!r} -> {tokenizer.decode(row, skip_special_tokens=True).strip()!r}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..training.demo import run_demo

    run_demo(method=args.method, steps=args.steps, output_dir=args.output_dir, overrides=args.set,
             progress=not args.quiet)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from ..config import available_methods, get_method

    for name in available_methods():
        spec = get_method(name)
        print(f"{name:14s} merge={spec.merge:9s} task ids at inference={'yes' if spec.task_ids_at_inference else 'no '}"
              f"  {spec.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (every option has help text)."""
    parser = argparse.ArgumentParser(prog="mtpeft", description="Multi-task low-rank adaptation of transformers "
                                     "models: train, evaluate, export, benchmark.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="Train a run config.", description="Train the tasks and method of a YAML run "
                       "config; writes checkpoints, the adapter, metrics and per-task evaluation to output_dir.")
    p.add_argument("config", help="YAML run config (see examples/).")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--resume", action="store_true", help="Continue from the latest checkpoint in output_dir.")
    p.add_argument("--quiet", action="store_true", help="No progress bars.")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("validate", help="Check a run config without running it.",
                       description="Validate a run config and its tasks; errors name the key and allowed values.")
    p.add_argument("config", help="YAML run config.")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("eval", help="Evaluate a trained run per task.",
                       description="Evaluate the run's adapter on its tasks' eval splits; prints and saves a table.")
    p.add_argument("run_dir", help="A run folder written by `mtpeft train`.")
    p.add_argument("--tasks", help="Comma-separated subset of the run's tasks.")
    p.add_argument("--batch-size", type=int, default=None, help="Evaluation batch size (default: the run's).")
    p.add_argument("--out", help="Where to save metrics and predictions (default: RUN_DIR/eval).")
    p.add_argument("--quiet", action="store_true", help="No progress bars.")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="Export a task's adapter as PEFT LoRA or a merged model.",
                       description="Export for serving: 'peft' writes adapter_config.json + adapter_model.safetensors "
                                   "(PEFT, vLLM, lm-eval load it); 'merged' writes a plain transformers model.")
    p.add_argument("run_dir", help="A run folder written by `mtpeft train`.")
    p.add_argument("--task", help="Task to export (needed by per-task methods; omit for task-agnostic ones).")
    p.add_argument("--format", choices=["peft", "merged"], default="peft", help="Output format.")
    p.add_argument("--rank", type=int, default=None,
                   help="Rank of an approximate export (input-routed methods), by SVD truncation.")
    p.add_argument("--out", required=True, help="Output folder.")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="Generate answers with a trained run.",
                       description="Greedy generation for one task on the given texts (already in prompt form).")
    p.add_argument("run_dir", help="A run folder written by `mtpeft train`.")
    p.add_argument("text", nargs="+", help="Prompt text(s).")
    p.add_argument("--task", help="Task whose adapter to use.")
    p.add_argument("--max-new-tokens", type=int, default=16, help="Generation budget.")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", help="Train a multi-task method on SmolLM2 and the built-in task suite.",
                       description="The embedded default: SmolLM2-135M-Instruct on four generated tasks; prints the "
                                   "per-task table before and after training, saves the adapter and a PEFT export.")
    p.add_argument("--method", default="mtl_lora", help="Method to train (see `mtpeft methods`).")
    p.add_argument("--steps", type=int, default=None, help="Optimizer steps (default: the demo's).")
    p.add_argument("--output-dir", default="runs/demo", help="Run folder.")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--quiet", action="store_true", help="No progress bars.")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("methods", help="List the available methods.", description="List registered methods.")
    p.set_defaults(func=cmd_methods)

    try:
        from .bench import add_bench_parsers
    except ImportError:  # the benchmark harness is optional at import time
        add_bench_parsers = None
    if add_bench_parsers is not None:
        add_bench_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mtpeft`` command."""
    from ..errors import MtpeftError, TrainingInterrupted

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TrainingInterrupted as exc:  # 128 + SIGINT, as shells report an interrupted command
        print(f"error: {exc}", file=sys.stderr)
        return 130
    except (MtpeftError, FileNotFoundError, ValueError) as exc:
        if os.environ.get("MTPEFT_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        print("(set MTPEFT_DEBUG=1 for the full traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
