"""Every training example's length, checked once when the tasks are loaded, before training starts.

The collator measures an example only when a batch samples it, which may be late in a run (and again on every
resume). :func:`screen_lengths` tokenizes all training examples up front (in batches: a few seconds for BBH's
4,350) and applies the over-long policy ``data.truncation`` to each: ``error`` stops at the first over-long
example naming its file and line, ``skip`` leaves the over-long ones out, ``left``/``right`` let the collator cut
them. What it did is counted per task, for the run summary.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from ..errors import DataFormatError, TruncationError
from .collator import OVERLONG_POLICIES, chat_prompt, tokenize_prompt
from .spec import Example, TaskData, TaskSpec

__all__ = ["screen_lengths", "example_lengths"]


def _where(example: Example) -> str:
    meta = example.meta or {}
    if meta.get("source") is None:
        return f"task {example.task!r}"
    return f"task {example.task!r}: {meta['source']} line {meta.get('line')} (record {meta.get('index')})"


def _token_rows(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """Token ids of each text: one batched call where the tokenizer takes a list, else one call per text."""
    if not texts:
        return []
    try:
        rows = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        if len(rows) == len(texts) and all(isinstance(r, list) for r in rows):
            return rows
    except (TypeError, ValueError, AttributeError, KeyError):  # a tokenizer that takes one text at a time
        pass
    return [list(tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"]) for t in texts]


def example_lengths(tokenizer: Any, examples: Sequence[Example]) -> list[tuple[int, int]]:
    """``(prompt tokens, target tokens with EOS)`` of each example, as the collator counts them (through the
    tokenizer's chat template where it was given one, see :func:`~mtpeft.data.collator.use_chat_template`)."""
    if examples and chat_prompt(tokenizer, examples[0].prompt) is not None:  # the template writes its specials
        prompts = _token_rows(tokenizer, [chat_prompt(tokenizer, ex.prompt) for ex in examples], False)
        eos = None
    else:
        prompts = _token_rows(tokenizer, [ex.prompt for ex in examples], True)
        eos = getattr(tokenizer, "eos_token_id", None)
    targets = _token_rows(tokenizer, [ex.target for ex in examples], False)
    out = []
    for ex, p, t in zip(examples, prompts, targets):
        if p and eos is not None and p[-1] == eos:  # tokenize_prompt drops an EOS the tokenizer added
            p = tokenize_prompt(tokenizer, ex.prompt)
        out.append((len(p), len(t) + 1))
    return out


def _problem(n_prompt: int, n_target: int, max_length: int, policy: str) -> str | None:
    """Why the collator could not take this example under ``policy`` (None: it fits, or it can be cut)."""
    if n_target > max_length:
        return f"the target alone is {n_target} tokens (with EOS), more than data.max_length={max_length}"
    if n_prompt + n_target <= max_length:
        return None
    if policy in ("error", "skip"):
        return (f"{n_prompt + n_target} tokens (prompt {n_prompt} + target {n_target} with EOS) exceed "
                f"data.max_length={max_length}")
    if policy == "right" and n_prompt >= max_length:
        return (f"the prompt alone is {n_prompt} tokens, so truncation='right' at data.max_length={max_length} "
                f"leaves no target token")
    return None


def screen_lengths(tasks: list[tuple[TaskSpec, TaskData]], tokenizer: Any, max_length: int, policy: str
                   ) -> tuple[list[tuple[TaskSpec, TaskData]], dict[str, Any]]:
    """Check every training example's length against ``max_length`` under ``policy`` (see the module docstring).

    Returns the tasks (under ``skip`` without their over-long examples) and a report: ``{"policy", "max_length",
    "examples", "truncated", "skipped", "tasks": {name: {"truncated", "skipped"}}}`` (only tasks with either).
    A warning says how many examples were cut or left out.

    Raises:
        TruncationError: an example the policy cannot take (under ``error`` any over-long one; under any policy
            but ``skip`` a target longer than ``max_length``), naming task, file and line and how many more there
            are.
        DataFormatError: under ``skip``, a task with no training example left.
    """
    if policy not in OVERLONG_POLICIES:
        raise ValueError(f"unknown truncation policy {policy!r}; allowed: {list(OVERLONG_POLICIES)}")
    report: dict[str, Any] = {"policy": policy, "max_length": max_length, "examples": 0, "truncated": 0,
                              "skipped": 0, "tasks": {}}
    screened, refused = [], []
    for spec, data in tasks:
        kept, counts = [], {"truncated": 0, "skipped": 0}
        for ex, (n_prompt, n_target) in zip(data.train, example_lengths(tokenizer, data.train)):
            problem = _problem(n_prompt, n_target, max_length, policy)
            if problem is not None and policy == "skip":
                counts["skipped"] += 1
                continue
            if problem is not None:
                refused.append((ex, problem))
            elif n_prompt + n_target > max_length:
                counts["truncated"] += 1
            kept.append(ex)
        if not kept and data.train:
            raise DataFormatError(f"task {spec.name!r}: all {len(data.train)} training examples are longer than "
                                  f"data.max_length={max_length} (data.truncation='skip' left none)")
        report["examples"] += len(kept)
        for key, n in counts.items():
            report[key] += n
        if any(counts.values()):
            report["tasks"][spec.name] = counts
        screened.append((spec, data if len(kept) == len(data.train) else TaskData(spec, kept, data.eval)))
    if refused:
        ex, problem = refused[0]
        more = f"; {len(refused) - 1} more training examples do not fit either" if len(refused) > 1 else ""
        raise TruncationError(f"{_where(ex)}: {problem}{more}. Raise data.max_length, or set data.truncation to "
                              f"'left' (cut the prompt's start) or 'skip' (leave such examples out)")
    if report["truncated"] or report["skipped"]:
        done = "cut to fit" if report["truncated"] else "left out"
        warnings.warn(f"{report['truncated'] or report['skipped']} training examples are longer than "
                      f"data.max_length={max_length} and were {done} (data.truncation={policy!r}): "
                      f"{report['tasks']}", stacklevel=2)
    return screened, report
