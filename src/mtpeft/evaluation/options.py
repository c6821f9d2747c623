"""Option log-likelihood scoring for multiple-choice and classification tasks.

The prediction is the option whose target text (``Example.option_targets``, e.g. ``" positive"``) has the
highest summed log-probability after the prompt (no length normalization, no EOS).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from ..data.collator import pad_token_id, tokenize_prompt, tokenize_target, truncate_prompt_left
from ..data.spec import Example
from .batching import length_sorted_batches, model_device

__all__ = ["option_texts", "predicted_options", "score_options"]


def option_texts(example: Example) -> list[str]:
    """The continuations scored for ``example``: its ``option_targets``, else each option after a space."""
    if example.option_targets is not None:
        return list(example.option_targets)
    if example.options is None:
        raise ValueError(f"task {example.task!r}: example has no options to score")
    return [" " + o for o in example.options]


def _option_rows(tokenizer: Any, examples: Sequence[Example],
                 max_length: int | None) -> list[tuple[int, int, list[int], int]]:
    """One row per (example, option): ``(example index, option index, prompt + option ids, first option
    position)``. Prompts longer than ``max_length`` minus the option keep their end."""
    rows: list[tuple[int, int, list[int], int]] = []
    for i, ex in enumerate(examples):
        prompt = tokenize_prompt(tokenizer, ex.prompt)
        for j, text in enumerate(option_texts(ex)):
            opt = tokenize_target(tokenizer, text)
            if not opt:
                raise ValueError(f"task {ex.task!r}, example {i}: option {text!r} tokenizes to nothing")
            p = prompt
            if max_length is not None and len(p) + len(opt) > max_length:
                p = truncate_prompt_left(tokenizer, p, max(1, max_length - len(opt)))
            if not p:
                raise ValueError(
                    f"task {ex.task!r}, example {i}: empty prompt; option scoring needs a prompt token"
                )
            rows.append((i, j, p + opt, len(p)))
    return rows


@torch.no_grad()
def score_options(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    task_id: int,
    *,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    max_length: int | None = None,
    progress_bar: Any = None,
) -> list[list[float]]:
    """Summed log-probability of each option's target text after the prompt, per example.

    Rows (prompt + option) are batched ``batch_size`` at a time, right-padded, through
    ``model(input_ids=..., attention_mask=..., task_ids=...).logits``. Prompts longer than
    ``max_length`` minus the option keep their end.
    """
    dev = torch.device(device) if device is not None else model_device(model)
    pad = pad_token_id(tokenizer)
    rows = _option_rows(tokenizer, examples, max_length)
    scores: list[list[float]] = [[0.0] * len(option_texts(ex)) for ex in examples]
    for batch in length_sorted_batches([len(ids) for _, _, ids, _ in rows], batch_size):
        chunk = [rows[r] for r in batch]
        seqs = [torch.tensor(ids, dtype=torch.long) for _, _, ids, _ in chunk]
        input_ids = pad_sequence(seqs, batch_first=True, padding_value=pad)
        attention_mask = pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True, padding_value=0)
        task_ids = torch.full((len(chunk),), task_id, dtype=torch.long, device=dev)
        logits = model(
            input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev), task_ids=task_ids
        ).logits
        for r, (i, j, ids, first) in enumerate(chunk):
            # logits at position t predict token t + 1
            step = logits[r, first - 1 : len(ids) - 1].float().log_softmax(-1)
            tgt = torch.tensor(ids[first:], dtype=torch.long, device=step.device)
            scores[i][j] = float(step.gather(-1, tgt[:, None]).sum())
        if progress_bar is not None:
            progress_bar.update(1)
    return scores


def predicted_options(examples: Sequence[Example], scores: Sequence[Sequence[float]]) -> list[str]:
    """Each example's highest-scoring option (its ``options`` entry, else the stripped option target)."""
    preds = []
    for ex, sc in zip(examples, scores):
        choices = ex.options if ex.options is not None else [t.strip() for t in option_texts(ex)]
        preds.append(choices[max(range(len(sc)), key=sc.__getitem__)])
    return preds
