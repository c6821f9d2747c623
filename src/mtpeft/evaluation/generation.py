"""Greedy generation for generation tasks: batched, left-padded prompts, continuations cut at EOS and at the
task's stop strings (as lm-eval's ``until`` cuts them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..data.collator import encode_prompts, eos_token_id, pad_token_id
from ..data.spec import Example
from .batching import length_sorted_batches, model_device

__all__ = ["cut_at_stop_strings", "early_stop_kwargs", "generate_predictions"]


def cut_at_stop(ids: list[int], stop: set[int]) -> list[int]:
    """``ids`` up to (not including) the first id in ``stop``."""
    for i, t in enumerate(ids):
        if t in stop:
            return ids[:i]
    return ids


def cut_at_stop_strings(text: str, stop: Sequence[str]) -> str:
    """``text`` before its stop strings, cut one stop string after the other exactly as lm-eval's ``until`` does
    (``text.split(s)[0]`` for each), so that both score the same answer."""
    for s in stop:
        if s:
            text = text.split(s)[0]
    return text


def early_stop_kwargs(tokenizer: Any, stop: Sequence[str]) -> dict[str, Any]:
    """``generate`` arguments that end a row once its continuation holds a stop string (transformers'
    ``stop_strings``), and the batch once every row has ended, instead of running every row to the token budget.
    The answers do not change: greedy tokens before the stop are the same, and the text is cut at it anyway."""
    strings = [s for s in stop if s]
    return {"stop_strings": strings, "tokenizer": tokenizer} if strings else {}


@torch.no_grad()
def generate_predictions(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    task_id: int,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    device: torch.device | str | None = None,
    max_length: int | None = None,
    progress_bar: Any = None,
    stop: Sequence[str] = (),
) -> list[str]:
    """Greedy-decode a continuation for each example's prompt (batched, left-padded).

    A row stops generating at EOS or once it holds a stop string (:func:`early_stop_kwargs`). Generations are cut
    at the first EOS id, only the new tokens are decoded (special tokens skipped), and the
    text is cut before the stop strings (:func:`cut_at_stop_strings`; e.g. ``["\\n"]``, see
    :meth:`~mtpeft.data.spec.TaskSpec.resolved_stop`). Examples are batched by similar prompt length; the output
    follows the input order.
    """
    dev = torch.device(device) if device is not None else model_device(model)
    eos, pad = eos_token_id(tokenizer), pad_token_id(tokenizer)
    out: list[str] = [""] * len(examples)
    # batched by prompt length in characters: no tokenizing twice, and close enough to the token count
    for idx in length_sorted_batches([len(ex.prompt) for ex in examples], batch_size):
        enc = encode_prompts(tokenizer, [examples[i].prompt for i in idx], max_length=max_length)
        input_ids = enc["input_ids"].to(dev)
        attention_mask = enc["attention_mask"].to(dev)
        task_ids = torch.full((len(idx),), task_id, dtype=torch.long, device=dev)
        gen = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            task_ids=task_ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
            **early_stop_kwargs(tokenizer, stop),
        )
        sequences = gen.sequences if hasattr(gen, "sequences") else gen
        new = sequences[:, input_ids.shape[1] :].tolist()
        for row, i in enumerate(idx):
            text = tokenizer.decode(cut_at_stop(new[row], {eos}), skip_special_tokens=True)
            out[i] = cut_at_stop_strings(text, stop)
        if progress_bar is not None:
            progress_bar.update(1)
    return out
