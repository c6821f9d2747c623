"""Evaluate a (multi-task) causal LM on tasks: greedy generation or option log-likelihood, per-task metrics.

Generation tasks are scored by batched greedy decoding (``model.generate``), cut at the EOS id and before the
task's stop strings (``TaskSpec.resolved_stop``: a newline for one-line targets, as lm-eval's ``until``), and the
task's metric (:mod:`.generation`). Multiple-choice and classification tasks are scored by option
log-likelihood (:mod:`.options`).

The model receives ``task_ids`` (a LongTensor of shape ``[batch]``) as a keyword in both ``forward`` and
``generate``, as an mtpeft ``MTModel`` expects.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from ..core import distributed
from ..data.metrics import compute_metric, score_example
from ..data.spec import Example, TaskData, TaskSpec
from .batching import model_device
from .generation import generate_predictions
from .options import option_texts, predicted_options, score_options
from .results import EvalResult

__all__ = ["evaluate"]


def _normalize_tasks(
    tasks: Sequence[tuple[TaskSpec, Sequence[Example]] | TaskData],
) -> list[tuple[TaskSpec, list[Example]]]:
    out = []
    for item in tasks:
        if isinstance(item, TaskData):
            out.append((item.spec, list(item.eval)))
        else:
            spec, examples = item
            out.append((spec, list(examples)))
    return out


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[tuple[TaskSpec, Sequence[Example]] | TaskData],
    task_names: Sequence[str],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    device: torch.device | str | None = None,
    progress: bool = True,
    max_length: int | None = None,
    shard: bool = False,
) -> EvalResult:
    """Evaluate ``model`` on each task's examples and compute the task metrics.

    Args:
        model: a causal LM whose ``forward`` and ``generate`` accept ``task_ids`` (an mtpeft ``MTModel``).
        tokenizer: its tokenizer (without a pad token, EOS pads).
        tasks: ``(spec, examples)`` pairs (or :class:`TaskData`, whose ``eval`` examples are used).
            Tasks without examples are skipped with a warning.
        task_names: the model's task order; a task's id is its index here.
        batch_size: prompts per generate call / (prompt, option) rows per forward pass.
        max_new_tokens: generation length limit.
        device: where to run; default the model's device.
        progress: show a tqdm progress bar.
        max_length: optional prompt length limit (prompts keep their end).
        shard: under data parallelism, each process evaluates every ``world``-th example of each task and the
            predictions are gathered, so every process returns the whole result. Every process must call this
            (a collective); in one process it changes nothing. Not for sharded models (FSDP, ZeRO-3), whose
            processes must run the same forward passes.

    Returns:
        :class:`EvalResult` with each task's primary metric (``spec.metric``) and extra metrics
        (``spec.extra_metrics``; binary ``f1`` for classification uses ``spec.resolved_positive_label()``).
    """
    from tqdm.auto import tqdm

    pairs = _normalize_tasks(tasks)
    rank, world = (distributed.rank(), distributed.world_size()) if shard else (0, 1)
    names = list(task_names)
    for spec, _ in pairs:
        if spec.name not in names:
            raise ValueError(f"task {spec.name!r} is not in task_names {names}")
    total = 0
    for spec, exs in pairs:
        mine = distributed.split_round_robin(exs, rank, world)
        n_rows = len(mine) if spec.type == "generation" else sum(len(option_texts(e)) for e in mine)
        total += math.ceil(n_rows / batch_size)
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    metrics: dict[str, dict[str, float]] = {}
    primary: dict[str, str] = {}
    predictions: list[dict[str, Any]] = []
    bar = tqdm(total=total, desc="evaluate", disable=not progress, unit="batch")
    try:
        for spec, exs in pairs:
            if not exs:
                warnings.warn(f"task {spec.name!r} has no examples to evaluate; skipped", stacklevel=2)
                continue
            bar.set_postfix_str(spec.name)
            tid = names.index(spec.name)
            option_scores: list[list[float]] | None = None
            mine = distributed.split_round_robin(exs, rank, world)
            if spec.type == "generation":
                preds = generate_predictions(model, tokenizer, mine, tid, batch_size=batch_size,
                                             max_new_tokens=max_new_tokens, device=device, max_length=max_length,
                                             progress_bar=bar, stop=spec.resolved_stop(ex.target for ex in exs))
            else:
                option_scores = score_options(model, tokenizer, mine, tid, batch_size=batch_size, device=device,
                                              max_length=max_length, progress_bar=bar)
                preds = predicted_options(mine, option_scores)
            if world > 1:
                preds, option_scores = _gathered_in_order(preds, option_scores, len(exs),
                                                          device or model_device(model))
            metrics[spec.name] = _task_metrics(spec, preds, [ex.reference for ex in exs])
            primary[spec.name] = spec.metric
            predictions += _prediction_records(spec, exs, preds, option_scores)
    finally:
        bar.close()
        if was_training and hasattr(model, "train"):
            model.train()
    return EvalResult(metrics, primary, predictions)


def _task_metrics(spec: TaskSpec, preds: list[str], refs: list[Any]) -> dict[str, float]:
    """The task's primary and extra metrics over its predictions, and ``n``, the number of examples."""
    assert spec.metric is not None
    task_metrics: dict[str, float] = {}
    for name in dict.fromkeys([spec.metric, *spec.extra_metrics]):
        opts: dict[str, Any] = {}
        if name == "f1" and spec.type == "classification":
            opts["positive_label"] = spec.resolved_positive_label()
        task_metrics[name] = compute_metric(name, preds, refs, **opts)
    task_metrics["n"] = len(refs)
    return task_metrics


def _prediction_records(spec: TaskSpec, examples: list[Example], preds: list[str],
                        option_scores: list[list[float]] | None) -> list[dict[str, Any]]:
    """One record per example for ``predictions.jsonl`` (see :class:`EvalResult`)."""
    records = []
    for k, (ex, pred) in enumerate(zip(examples, preds)):
        s = score_example(spec.metric, pred, ex.reference)
        rec: dict[str, Any] = {
            "task": spec.name,
            "prompt": ex.prompt,
            "prediction": pred,
            "reference": ex.reference,
            "correct": s >= 1.0,
            "score": s,
        }
        if option_scores is not None:
            rec["option_logprobs"] = option_scores[k]
        records.append(rec)
    return records


def _gathered_in_order(preds: list[str], scores: list[list[float]] | None, total: int,
                       device: torch.device | str) -> tuple[list[str], list[list[float]] | None]:
    """Every process's predictions (and option scores) for its ``split_round_robin`` share, gathered and put
    back in example order. The payload travels as UTF-8 JSON bytes in a tensor: no pickling."""
    world = distributed.world_size()
    payload = json.dumps([preds, scores], ensure_ascii=False).encode("utf-8")
    local = torch.tensor(list(payload), dtype=torch.uint8, device=device)[None]
    rows = distributed.gather_rows(local)  # (world, longest payload), zero-padded; JSON text has no NUL bytes
    ordered_preds: list[Any] = [None] * total
    ordered_scores: list[Any] | None = None if scores is None else [None] * total
    for r, row in enumerate(rows.cpu()):
        part_preds, part_scores = json.loads(bytes(row.tolist()).rstrip(b"\0").decode("utf-8"))
        for k, pred in enumerate(part_preds):
            ordered_preds[r + k * world] = pred
            if ordered_scores is not None:
                ordered_scores[r + k * world] = part_scores[k]
    return ordered_preds, ordered_scores
