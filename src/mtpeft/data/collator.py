"""Turn examples into padded tensors for training (loss on target tokens only) and generation.

Prompt and target are tokenized separately and concatenated as ids: ``prompt ids + target ids + EOS id``.
EOS is appended by its id, never as text (some tokenizers, e.g. SmolLM2's GGUF one, do not parse the
EOS text back into the single special token). Labels are -100 on prompt and padding tokens.

A tokenizer given :func:`use_chat_template` wraps every prompt in its chat template (one user turn and the
generation prompt, as lm-eval's ``--apply_chat_template`` does) wherever mtpeft tokenizes one: training,
generation, option scoring, predict and bench all go through :func:`tokenize_prompt`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import TruncationError
from .packing import IGNORE_INDEX, pack_encoded
from .spec import Example

__all__ = [
    "IGNORE_INDEX",
    "TRUNCATION_POLICIES",
    "OVERLONG_POLICIES",
    "TruncationError",
    "MultiTaskCollator",
    "encode_prompts",
    "pad_rows",
    "tokenize_prompt",
    "tokenize_target",
    "pad_token_id",
    "eos_token_id",
    "truncate_prompt_left",
    "use_chat_template",
    "chat_prompt",
]

#: Allowed ``truncation`` values of :class:`MultiTaskCollator`.
TRUNCATION_POLICIES: tuple[str, ...] = ("left", "right", "error")
#: Allowed ``data.truncation`` values of a run: ``skip`` leaves over-long examples out when the tasks are loaded
#: (:func:`mtpeft.data.lengths.screen_lengths`); one that reaches the collator anyway is an error there.
OVERLONG_POLICIES: tuple[str, ...] = (*TRUNCATION_POLICIES, "skip")


def eos_token_id(tokenizer: Any) -> int:
    """The tokenizer's EOS id (the first one if it has several).

    Raises:
        ValueError: the tokenizer has no EOS token.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id; set tokenizer.eos_token")
    return int(eos)


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, or its EOS id when it has no pad token."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else eos_token_id(tokenizer)


#: The tokenizer attribute :func:`use_chat_template` sets: the chat template prompts go through, or None.
CHAT_TEMPLATE_ATTR = "mtpeft_chat_template"


def use_chat_template(tokenizer: Any, setting: str | None) -> Any:
    """Make ``tokenizer`` wrap the prompts mtpeft tokenizes in a chat template; returns the tokenizer.

    ``setting`` is ``data.chat_template``: ``"auto"`` uses the tokenizer's own template when it has one (instruct
    models) and none otherwise, ``"none"`` (or None) none, anything else is a Jinja chat template to use.
    """
    if setting in (None, "none"):
        template = None
    elif setting == "auto":
        template = getattr(tokenizer, "chat_template", None) or None
    else:
        template = setting
    setattr(tokenizer, CHAT_TEMPLATE_ATTR, template)
    return tokenizer


def chat_prompt(tokenizer: Any, text: str) -> str | None:
    """``text`` as one user turn of the tokenizer's chat template, with the generation prompt; None when the
    tokenizer was given no chat template (see :func:`use_chat_template`)."""
    template = getattr(tokenizer, CHAT_TEMPLATE_ATTR, None)
    if not template:
        return None
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], chat_template=template,
                                         tokenize=False, add_generation_prompt=True)


def _special_ids(tokenizer: Any) -> set[int]:
    return set(getattr(tokenizer, "all_special_ids", []) or [])


def tokenize_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt, with the tokenizer's leading special tokens (e.g. BOS), never a trailing EOS.

    Under a chat template (:func:`use_chat_template`) the prompt is the rendered chat, whose special tokens the
    template writes itself."""
    chat = chat_prompt(tokenizer, text)
    if chat is not None:
        return list(tokenizer(chat, add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if ids and eos is not None and ids[-1] == eos:
        plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not plain or plain[-1] != eos:  # added by the tokenizer, not written in the text
            ids = ids[:-1]
    return ids


def tokenize_target(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a target continuation, without special tokens (EOS is appended by the caller)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _leading_specials(ids: Sequence[int], specials: set[int]) -> int:
    n = 0
    while n < len(ids) and ids[n] in specials:
        n += 1
    return n


def _truncate_left(ids: list[int], keep: int, n_special: int) -> list[int]:
    """Keep ``keep`` tokens: the leading special tokens plus the end of the sequence."""
    if len(ids) <= keep:
        return ids
    n_special = min(n_special, keep)
    return ids[:n_special] + ids[len(ids) - (keep - n_special) :]


def truncate_prompt_left(tokenizer: Any, ids: list[int], keep: int) -> list[int]:
    """A prompt's token ids cut to ``keep`` tokens as the collator cuts them: leading special tokens plus the end."""
    return _truncate_left(ids, keep, _leading_specials(ids, _special_ids(tokenizer)))


def _pads_itself(tokenizer: Any) -> bool:
    """Whether the tokenizer's own ``pad`` can pad input ids: it has one and a pad token (``pad`` refuses to pad
    without one, where mtpeft pads with EOS)."""
    names = getattr(tokenizer, "model_input_names", None) or ["input_ids"]
    return callable(getattr(tokenizer, "pad", None)) and getattr(tokenizer, "pad_token_id", None) is not None \
        and names[0] == "input_ids"


def pad_rows(tokenizer: Any, rows: Sequence[Sequence[int]], side: str = "right", pad_to_multiple_of: int | None = None,
             labels: Sequence[Sequence[int]] | None = None) -> dict[str, torch.Tensor]:
    """Pad rows of token ids to one width on ``side`` (``"right"`` for training, ``"left"`` for generation): LongTensors
    ``input_ids`` and ``attention_mask``, and ``labels`` (padded with IGNORE_INDEX) when given.

    The tokenizer's own ``pad`` pads where the tokenizer has a pad token; without one EOS pads, the same way by hand.
    The width is the longest row, rounded up to a multiple of ``pad_to_multiple_of``.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if _pads_itself(tokenizer):
        padded = tokenizer.pad({"input_ids": [list(r) for r in rows]}, padding=True, padding_side=side,
                               pad_to_multiple_of=pad_to_multiple_of, return_attention_mask=True, return_tensors="pt")
        out = {"input_ids": padded["input_ids"].long(), "attention_mask": padded["attention_mask"].long()}
    else:
        width = max(len(r) for r in rows)
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        out = {"input_ids": torch.full((len(rows), width), pad_token_id(tokenizer), dtype=torch.long),
               "attention_mask": torch.zeros((len(rows), width), dtype=torch.long)}
        for i, r in enumerate(rows):
            _place(out["input_ids"][i], r, side)
            _place(out["attention_mask"][i], [1] * len(r), side)
    if labels is not None:
        out["labels"] = torch.full_like(out["input_ids"], IGNORE_INDEX)
        for i, r in enumerate(labels):
            _place(out["labels"][i], r, side)
    return out


def _place(row: torch.Tensor, values: Sequence[int], side: str) -> None:
    if values:
        where = slice(0, len(values)) if side == "right" else slice(row.numel() - len(values), row.numel())
        row[where] = torch.tensor(values, dtype=torch.long)


class MultiTaskCollator:
    """Collate :class:`~mtpeft.data.tasks.Example` lists into training batches.

    Args:
        tokenizer: a Hugging Face tokenizer (fast or slow); without a pad token, EOS pads.
        task_names: task order; ``task_ids`` in the batch index into it.
        max_length: maximum sequence length (prompt + target + EOS).
        truncation: what to do with a too-long example: ``"left"`` (default) drops tokens from the start
            of the prompt (after any leading BOS) so the target stays whole; ``"right"`` keeps the first
            ``max_length`` tokens (the target may be cut; at least one target token must remain);
            ``"error"`` raises, and so does ``"skip"`` (such examples are left out before they get here).
            In every policy, a target (with EOS) longer than ``max_length`` raises.
        pad_to_multiple_of: round the padded length up to a multiple of this.
        packing: pack the examples into as few rows of ``max_length`` as fit (:mod:`mtpeft.data.packing`)
            instead of one right-padded row each.

    Calling the collator on a list of examples returns LongTensors ``input_ids``, ``attention_mask``,
    ``labels`` (-100 on prompt and padding) and ``task_ids`` (shape ``[batch]``), right-padded; with ``packing``
    the packed batch of :func:`~mtpeft.data.packing.pack_encoded`. :meth:`padded` is always the padded one.
    """

    def __init__(
        self,
        tokenizer: Any,
        task_names: Sequence[str],
        max_length: int = 512,
        truncation: str = "left",
        pad_to_multiple_of: int | None = None,
        packing: bool = False,
    ) -> None:
        if truncation not in OVERLONG_POLICIES:
            raise ValueError(
                f"unknown truncation policy {truncation!r}; allowed: {list(OVERLONG_POLICIES)}"
            )
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        if not task_names:
            raise ValueError("task_names is empty")
        if len(set(task_names)) != len(task_names):
            raise ValueError(f"task_names contain duplicates: {list(task_names)}")
        self.tokenizer = tokenizer
        self.task_names = list(task_names)
        self.task_index: Mapping[str, int] = {n: i for i, n in enumerate(self.task_names)}
        self.max_length = int(max_length)
        self.truncation = truncation
        self.pad_to_multiple_of = pad_to_multiple_of
        self.packing = bool(packing)
        self.eos_id = eos_token_id(tokenizer)
        self.pad_id = pad_token_id(tokenizer)
        self._specials = _special_ids(tokenizer)

    def task_id(self, task: str) -> int:
        """Index of ``task`` in ``task_names``."""
        try:
            return self.task_index[task]
        except KeyError:
            raise KeyError(
                f"example of task {task!r}, which is not in task_names {self.task_names}"
            ) from None

    def encode(self, example: Example, index: int | None = None) -> tuple[list[int], list[int]]:
        """Tokenize one example into ``(input_ids, labels)`` after the truncation policy.

        ``index`` (the example's position, for error messages) is optional.
        """
        where = f"task {example.task!r}, example {index if index is not None else '?'}"
        prompt = tokenize_prompt(self.tokenizer, example.prompt)
        target = tokenize_target(self.tokenizer, example.target) + [self.eos_id]
        if len(target) > self.max_length:
            raise TruncationError(
                f"{where}: the target alone is {len(target)} tokens (with EOS), more than max_length="
                f"{self.max_length}; raise max_length or shorten the target"
            )
        total = len(prompt) + len(target)
        if total > self.max_length:
            if self.truncation in ("error", "skip"):
                raise TruncationError(
                    f"{where}: {total} tokens (prompt {len(prompt)} + target {len(target)}) exceed "
                    f"max_length={self.max_length} and truncation={self.truncation!r}"
                )
            if self.truncation == "left":
                prompt = _truncate_left(
                    prompt, self.max_length - len(target), _leading_specials(prompt, self._specials)
                )
            else:  # right
                if len(prompt) >= self.max_length:
                    raise TruncationError(
                        f"{where}: the prompt alone is {len(prompt)} tokens, so truncation='right' at "
                        f"max_length={self.max_length} leaves no target token; use truncation='left'"
                    )
                ids = (prompt + target)[: self.max_length]
                return ids, [IGNORE_INDEX] * len(prompt) + ids[len(prompt) :]
        return prompt + target, [IGNORE_INDEX] * len(prompt) + target

    def __call__(self, batch: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Collate examples into right-padded LongTensors, or packed rows with ``packing`` (see the class
        docstring)."""
        if not self.packing:
            return self.padded(batch)
        if not batch:
            raise ValueError("cannot collate an empty batch")
        encoded = [self.encode(ex, i) for i, ex in enumerate(batch)]
        return pack_encoded(encoded, [self.task_id(ex.task) for ex in batch], self.max_length, self.pad_id,
                            self.pad_to_multiple_of or None)

    def padded(self, batch: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Collate examples into right-padded LongTensors, one row each (whatever ``packing`` says)."""
        if not batch:
            raise ValueError("cannot collate an empty batch")
        encoded = [self.encode(ex, i) for i, ex in enumerate(batch)]
        padded = pad_rows(self.tokenizer, [ids for ids, _ in encoded], side="right",
                          pad_to_multiple_of=self.pad_to_multiple_of or None, labels=[labs for _, labs in encoded])
        padded["task_ids"] = torch.tensor([self.task_id(ex.task) for ex in batch], dtype=torch.long)
        return padded


def encode_prompts(
    tokenizer: Any, prompts: Sequence[str], max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """Tokenize prompts for batched generation: LEFT-padded ``input_ids`` and ``attention_mask``.

    Prompts longer than ``max_length`` keep their leading special tokens and their end (the part next
    to the answer). Without a pad token, EOS pads.
    """
    if not prompts:
        raise ValueError("no prompts to encode")
    specials = _special_ids(tokenizer)
    rows = [tokenize_prompt(tokenizer, p) for p in prompts]
    if max_length is not None:
        rows = [_truncate_left(r, max_length, _leading_specials(r, specials)) for r in rows]
    return pad_rows(tokenizer, rows, side="left")
