"""``mtpeft export RUN_DIR --out DIR``: a task's adapter as PEFT LoRA, or a merged plain transformers model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..io.output_dir import EXPORT_REPORT, check_export_folder
from ..runs import load_run
from .checks import check_remote_code
from .options import add_overwrite_option, add_trust_remote_code_option

#: Training batches per task that calibrate an approximate export of an input-routed method.
DEFAULT_CALIBRATION_BATCHES = 8


def add_parser(subparsers: Any) -> None:
    """Add the ``export`` subcommand."""
    p = subparsers.add_parser("export", help="Export a task's adapter as PEFT LoRA or a merged model.",
                              description="Export for serving: 'peft' writes adapter_config.json + "
                              "adapter_model.safetensors (PEFT, vLLM, lm-eval load it); 'merged' writes a plain "
                              "transformers model.")
    p.add_argument("run_dir", help="A run folder written by `mtpeft train`.")
    p.add_argument("--task", help="Task to export (needed by per-task methods; omit for task-agnostic ones).")
    p.add_argument("--format", choices=["peft", "merged"], default="peft", help="Output format.")
    p.add_argument("--rank", type=int, default=None,
                   help="Rank of an approximate export (input-routed methods), by SVD truncation.")
    p.add_argument("--calibration-batches", type=int, default=DEFAULT_CALIBRATION_BATCHES, metavar="N",
                   help="With --rank, for input-routed methods: how many of the run's training batches (of the "
                   "exported task, or of every task) estimate the routing and measure the approximation error "
                   f"(default {DEFAULT_CALIBRATION_BATCHES}).")
    p.add_argument("--out", required=True, help="Output folder (missing, empty, or an earlier export of this "
                   "format; never inside the run folder).")
    add_overwrite_option(p, "--out")
    add_trust_remote_code_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the export (with the tokenizer) and say how to load it."""
    out = Path(args.out)
    check_export_folder(out, args.format, args.run_dir, overwrite=args.overwrite)  # before anything is loaded
    if args.calibration_batches < 1:
        raise UsageError(f"--calibration-batches must be at least 1, got {args.calibration_batches}")
    check_remote_code(args.run_dir, args.trust_remote_code)
    cfg, tokenizer, model = load_run(args.run_dir)
    if args.format == "peft":
        calibration = None
        if args.rank is not None and model.merge_kind == "none":  # input-routed: routing statistics from data
            calibration = calibration_batches(cfg, tokenizer, model, args.task, args.calibration_batches)
        report = model.export_peft(out, task=args.task, rank=args.rank, calibration=calibration)
        tokenizer.save_pretrained(out)
        print(json.dumps(report, indent=2, default=str))
        if calibration is not None:
            print(f"\napproximation error (relative, adapter outputs on {report['calibration_tokens']} tokens of "
                  f"{len(calibration)} training batches): {report['relative_error']:.4f}")
        print(f"\nPEFT LoRA written to {out}: load with peft.PeftModel.from_pretrained(base, '{out}'), "
              f"or serve with vLLM --enable-lora --lora-modules {args.task or 'adapter'}={out}")
    else:
        merged = model.merge_and_unload(task=args.task)
        merged.save_pretrained(out)
        tokenizer.save_pretrained(out)
        report = {"format": "merged", "run": str(args.run_dir), "task": args.task, "method": cfg.method["method"]}
        (out / EXPORT_REPORT).write_text(json.dumps(report, indent=2) + "\n")  # marks the folder as mtpeft's
        print(f"merged model written to {out} (a plain transformers model)")
    return 0


def calibration_batches(cfg: Any, tokenizer: Any, model: Any, task: str | None, count: int) -> list[dict[str, Any]]:
    """The first ``count`` training batches of ``task`` (of every task when None) from the run's own data, built
    as the trainer builds them (its collator, batch size and task order)."""
    from ..data.collator import MultiTaskCollator
    from ..data.mixing import leading_batches
    from ..data.resolve import resolve_task_specs
    from ..data.tasks import load_tasks

    specs = [spec for spec in resolve_task_specs(cfg) if task is None or spec.name == task]
    if not specs:
        raise UsageError(f"unknown task {task!r}; the run's tasks: {model.tasks}")
    collator = MultiTaskCollator(tokenizer, model.tasks, max_length=cfg.data.max_length,
                                 truncation=cfg.data.truncation)
    examples = [data.train for data in load_tasks(specs, cfg.data.root)]
    return [collator(chunk) for chunk in leading_batches(examples, cfg.train.batch_size, count)]
