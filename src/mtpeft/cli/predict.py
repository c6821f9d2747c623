"""``mtpeft predict RUN_DIR TEXT...``: greedy answers of a trained run for one task, one line per prompt."""

from __future__ import annotations

import argparse
from typing import Any

from ..runs import load_run


def add_parser(subparsers: Any) -> None:
    """Add the ``predict`` subcommand."""
    p = subparsers.add_parser("predict", help="Generate answers with a trained run.",
                              description="Greedy generation for one task on the given texts (already in prompt "
                              "form).")
    p.add_argument("run_dir", help="A run folder written by `mtpeft train`.")
    p.add_argument("text", nargs="+", help="Prompt text(s).")
    p.add_argument("--task", help="Task whose adapter to use.")
    p.add_argument("--max-new-tokens", type=int, default=16, help="Generation budget.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Generate for every text in one batch; print ``'prompt' -> 'answer'`` lines."""
    import torch

    from ..data.collator import encode_prompts, eos_token_id
    from ..evaluation.generation import cut_at_stop

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
        answer = cut_at_stop(row.tolist(), {eos})
        print(f"{text!r} -> {tokenizer.decode(answer, skip_special_tokens=True).strip()!r}")
    return 0
