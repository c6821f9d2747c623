"""``mtpeft predict RUN_DIR TEXT...``: greedy answers of a trained run for one task, one line per prompt.

Answers end where ``mtpeft eval`` ends them: at EOS and before the task's stop strings (``TaskSpec.resolved_stop``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import MtpeftError, UsageError
from ..runs import load_run
from .checks import check_remote_code
from .options import add_trust_remote_code_option


def add_parser(subparsers: Any) -> None:
    """Add the ``predict`` subcommand."""
    p = subparsers.add_parser("predict", help="Generate answers with a trained run.",
                              description="Greedy generation for one task on the given texts (already in prompt "
                              "form).")
    p.add_argument("run_dir", help="A run folder written by `mtpeft train`.")
    p.add_argument("text", nargs="+", help="Prompt text(s).")
    p.add_argument("--task", help="Task whose adapter to use.")
    p.add_argument("--max-new-tokens", type=int, default=16, help="Generation budget.")
    add_trust_remote_code_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Generate for every text in one batch; print ``'prompt' -> 'answer'`` lines."""
    import torch

    from ..data.collator import encode_prompts, eos_token_id
    from ..evaluation.generation import cut_at_stop, cut_at_stop_strings, early_stop_kwargs

    empty = [i for i, text in enumerate(args.text, 1) if not text.strip()]
    if empty:
        raise UsageError(f"prompt {empty[0]} is empty: give the text to answer")
    check_remote_code(args.run_dir, args.trust_remote_code)
    cfg, tokenizer, model = load_run(args.run_dir)
    model.eval()
    if args.task is None and model.tasks and model.method.task_ids_at_inference:
        raise UsageError(f"{cfg.method['method']} keeps an adapter per task: pass --task, one of {model.tasks}")
    task_id = model.task_index(args.task) if model.tasks and args.task is not None else None
    batch = encode_prompts(tokenizer, args.text, max_length=cfg.data.max_length)
    ids = None if task_id is None else torch.full((len(args.text),), task_id)
    eos = eos_token_id(tokenizer)
    stop = _stop_strings(cfg, args.task or (model.tasks[0] if len(model.tasks) == 1 else None))
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], task_ids=ids,
                         max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=eos,
                         pad_token_id=tokenizer.pad_token_id, **early_stop_kwargs(tokenizer, stop))
    for text, row in zip(args.text, out[:, batch["input_ids"].shape[1]:]):
        answer = cut_at_stop_strings(tokenizer.decode(cut_at_stop(row.tolist(), {eos}), skip_special_tokens=True), stop)
        print(f"{text!r} -> {answer.strip()!r}")
    return 0


def _stop_strings(cfg: Any, task: str | None) -> list[str]:
    """The run's stop strings for ``task``, as evaluation resolves them (a newline for one-line targets); without a
    known task a newline."""
    from ..data.resolve import resolve_task_specs
    from ..data.tasks import load_task

    spec = next((s for s in resolve_task_specs(cfg) if s.name == task), None)
    if spec is None:
        return ["\n"]
    if spec.stop is not None:
        return list(spec.stop)
    try:  # the default depends on the task's targets
        data = load_task(spec, cfg.data.root)
    except (MtpeftError, OSError, ValueError) as exc:
        print(f"note: task {task!r}: its data could not be read ({exc}); answers end at a newline", file=sys.stderr)
        return ["\n"]
    return spec.resolved_stop(ex.target for ex in [*data.train, *data.eval])
