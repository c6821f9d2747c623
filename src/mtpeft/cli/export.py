"""``mtpeft export RUN_DIR --out DIR``: a task's adapter as PEFT LoRA, or a merged plain transformers model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..runs import load_run


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
    p.add_argument("--out", required=True, help="Output folder.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the export (with the tokenizer) and say how to load it."""
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
