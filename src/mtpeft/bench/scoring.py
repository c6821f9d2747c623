"""How the benchmark evaluates: a model with fixed task ids, per-task metric records, macro/micro averages,
and the unseen-task policy (:data:`~mtpeft.bench.options.UNSEEN_POLICIES`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..registry import get_method


class FixedTaskIds(nn.Module):
    """Wraps a model for :func:`mtpeft.evaluation.evaluator.evaluate` and replaces the task ids it is given.

    ``task_id=None`` passes no task id (task-agnostic methods; MoE-LoRA's unknown-task gate); an int passes
    that id for every row; ``drop=True`` passes no ``task_ids`` keyword at all (a plain transformers model).
    """

    def __init__(self, model: nn.Module, task_id: int | None = None, drop: bool = False) -> None:
        super().__init__()
        self.inner = model
        self.task_id = task_id
        self.drop = drop

    def _kwargs(self, task_ids: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if self.drop:
            return kwargs
        if self.task_id is None or task_ids is None:
            return {**kwargs, "task_ids": None}
        ids = torch.full_like(task_ids, self.task_id) if isinstance(task_ids, torch.Tensor) else self.task_id
        return {**kwargs, "task_ids": ids}

    def forward(self, *args: Any, task_ids: Any = None, **kwargs: Any) -> Any:
        return self.inner(*args, **self._kwargs(task_ids, kwargs))

    def generate(self, *args: Any, task_ids: Any = None, **kwargs: Any) -> Any:
        return self.inner.generate(*args, **self._kwargs(task_ids, kwargs))


def task_metrics_dict(result: Any) -> dict[str, dict[str, Any]]:
    """An EvalResult as ``{task: {"metric", "score", "n", "metrics", "items"}}``; ``items``: the primary metric of
    every test example in eval order (what :mod:`mtpeft.bench.paired` pairs across methods), when the result
    holds its predictions."""
    items: dict[str, list[float]] = {}
    for pred in getattr(result, "predictions", None) or []:
        items.setdefault(pred["task"], []).append(float(pred["score"]))
    out = {}
    for task, metric in result.primary.items():
        values = dict(result.metrics[task])
        out[task] = {
            "metric": metric,
            "score": float(values[metric]),
            "n": int(values.get("n", 0)),
            "metrics": {k: float(v) for k, v in values.items() if k != "n"},
        }
        if task in items:
            out[task]["items"] = items[task]
    return out


def macro_score(tasks: dict[str, dict[str, Any]]) -> float | None:
    """The mean of the tasks' primary scores (NaN scores left out; None without a score)."""
    scores = [t["score"] for t in tasks.values() if t["score"] is not None and not math.isnan(t["score"])]
    return sum(scores) / len(scores) if scores else None


def micro_score(tasks: dict[str, dict[str, Any]]) -> float | None:
    """The primary scores averaged over examples (each task weighted by its ``n``; None without examples)."""
    total = sum(t["n"] for t in tasks.values())
    if not total:
        return None
    return sum(t["score"] * t["n"] for t in tasks.values()) / total


def load_eval_examples(entries: Sequence[Any], cfg: Any, *, unseen: bool = False) -> list[tuple[Any, list[Any]]]:
    """(spec, eval examples) of task entries; an unseen task without an eval split is evaluated on all of its
    examples (capped by ``data.max_eval_per_task``), as nothing trains on it."""
    from ..data.resolve import resolve_task_specs
    from ..data.tasks import load_task

    if not entries:
        return []
    specs = resolve_task_specs(dataclasses.replace(cfg, tasks=list(entries)))
    out = []
    for spec in specs:
        data = load_task(spec, cfg.data.root)
        examples = list(data.eval)
        if unseen and not examples:
            examples = list(data.train)[: cfg.data.max_eval_per_task or None]
        out.append((spec, examples))
    return out


def evaluate_with(
    model: nn.Module, tokenizer: Any, tasks: list[tuple[Any, list[Any]]], cfg: Any, progress: bool = False
) -> dict[str, dict[str, Any]]:
    """Evaluate ``model`` (a FixedTaskIds wrapper) on (spec, examples) pairs; per-task metrics dict."""
    from ..evaluation.evaluator import evaluate

    tasks = [(s, e) for s, e in tasks if e]
    if not tasks:
        return {}
    device = next(model.parameters()).device
    result = evaluate(
        model,
        tokenizer,
        tasks,
        [s.name for s, _ in tasks],
        batch_size=cfg.eval.batch_size,
        max_new_tokens=cfg.eval.max_new_tokens,
        device=device,
        progress=progress,
    )
    return task_metrics_dict(result)


def unseen_task_id(method: str, policy: str) -> tuple[str, int | None]:
    """How unseen tasks are evaluated for ``method`` under ``policy`` -> (action, task id).

    action: 'none' (no task id), 'id' (task id 0 / the first task's adapter) or 'skip'.
    """
    if method == "untrained":
        return "none", None
    # peft_lora is PEFT's LoRA on the lora run's config: task-agnostic as lora is
    needs_id = method == "single_task_lora" or get_method(
        "lora" if method == "peft_lora" else method
    ).task_ids_at_inference
    if policy == "first_task":
        return "id", 0
    if not needs_id:
        return "none", None
    return ("skip", None) if policy == "skip" else ("id", 0)


def describe_unseen(method: str, action: str, first_task: str) -> str:
    """How a method's unseen tasks were evaluated, in words (for the result record and the report)."""
    if action == "skip":
        return "skipped (the method needs a task id at inference)"
    if action == "none":
        if method == "moe_lora":
            return "no task id (MoE-LoRA's learned unknown-task gate)"
        return "no task id"
    if method == "single_task_lora":
        return f"the first task's adapter ({first_task})"
    return f"task id 0 ({first_task})"


def evaluate_unseen(
    model: nn.Module,
    tokenizer: Any,
    cfg: Any,
    method: str,
    entries: list[Any],
    first_task: str,
    policy: str,
    progress: bool = False,
) -> tuple[dict[str, Any], str]:
    """Evaluate the unseen task ``entries`` under ``policy`` -> (per-task metrics, how it was done)."""
    if not entries:
        return {}, ""
    action, tid = unseen_task_id(method, policy)
    how = describe_unseen(method, action, first_task)
    if action == "skip":
        return {}, how
    wrapped = FixedTaskIds(model, tid, drop=method in ("untrained", "peft_lora"))  # plain transformers/PEFT models
    tasks = load_eval_examples(entries, cfg, unseen=True)
    return evaluate_with(wrapped, tokenizer, tasks, cfg, progress), how
