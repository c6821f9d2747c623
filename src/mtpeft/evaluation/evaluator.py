"""Evaluate a (multi-task) causal LM on tasks: greedy generation or option log-likelihood, per-task metrics.

Generation tasks are scored by batched greedy decoding (``model.generate``), cut at the EOS id, and the
task's metric. Multiple-choice and classification tasks are scored by option log-likelihood: the
prediction is the option whose target text (``Example.option_targets``, e.g. ``" positive"``) has the
highest summed log-probability after the prompt (no length normalization, no EOS).

The model receives ``task_ids`` (a LongTensor of shape ``[batch]``) as a keyword in both ``forward`` and
``generate``, as an mtpeft ``MTModel`` expects.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.collator import (
    _leading_specials,
    _special_ids,
    _truncate_left,
    encode_prompts,
    eos_token_id,
    pad_token_id,
    tokenize_prompt,
    tokenize_target,
)
from ..data.metrics import compute_metric, score_example
from ..data.tasks import Example, TaskData, TaskSpec

__all__ = ["EvalResult", "evaluate", "compare_table", "generate_predictions", "score_options"]


# ------------------------------------------------------------------------------------------ result


@dataclass
class EvalResult:
    """Evaluation results.

    Attributes:
        metrics: ``{task: {metric_name: value, ..., "n": count}}``; values are fractions (0.5 = 50%).
        primary: ``{task: metric_name}``, the metric that enters the averages.
        predictions: one dict per example: ``task``, ``prompt``, ``prediction``, ``reference``,
            ``correct`` (bool), ``score`` (the primary metric's per-example score), and for option
            scoring ``option_logprobs``.
    """

    metrics: dict[str, dict[str, float]]
    primary: dict[str, str]
    predictions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def macro(self) -> float:
        """Unweighted mean over tasks of each task's primary metric (a fraction; NaN without tasks)."""
        vals = [self.metrics[t][m] for t, m in self.primary.items()]
        return sum(vals) / len(vals) if vals else math.nan

    @property
    def micro(self) -> float:
        """Mean of the tasks' primary metrics weighted by their number of examples (NaN without tasks)."""
        total = sum(self.metrics[t]["n"] for t in self.primary)
        if not total:
            return math.nan
        return sum(self.metrics[t][m] * self.metrics[t]["n"] for t, m in self.primary.items()) / total

    def score(self, task: str) -> float:
        """The primary metric of ``task``."""
        return self.metrics[task][self.primary[task]]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict: ``tasks`` (the metrics), ``primary``, ``macro``, ``micro``."""
        return {"tasks": self.metrics, "primary": self.primary, "macro": self.macro, "micro": self.micro}

    @classmethod
    def from_dict(cls, data: dict[str, Any], predictions: list[dict[str, Any]] | None = None) -> EvalResult:
        """Inverse of :meth:`to_dict` (``macro``/``micro`` are recomputed)."""
        try:
            return cls(dict(data["tasks"]), dict(data["primary"]), list(predictions or []))
        except KeyError as exc:
            raise ValueError(f"not an EvalResult dict: missing key {exc}") from None

    def save(self, directory: str | Path) -> Path:
        """Write ``metrics.json``, ``metrics.md`` (a Markdown table) and ``predictions.jsonl``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "metrics.json").write_text(
            json.dumps(self.to_dict(), indent=2, allow_nan=True) + "\n", encoding="utf-8"
        )
        (d / "metrics.md").write_text(self.format_table(markdown=True) + "\n", encoding="utf-8")
        with (d / "predictions.jsonl").open("w", encoding="utf-8") as fh:
            for p in self.predictions:
                fh.write(json.dumps(p, ensure_ascii=False) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | Path) -> EvalResult:
        """Read a result written by :meth:`save`."""
        d = Path(directory)
        data = json.loads((d / "metrics.json").read_text(encoding="utf-8"))
        preds: list[dict[str, Any]] = []
        pred_file = d / "predictions.jsonl"
        if pred_file.exists():
            preds = [
                json.loads(line)
                for line in pred_file.read_text(encoding="utf-8").splitlines()
                if line.strip()
            ]
        return cls.from_dict(data, preds)

    def format_table(self, markdown: bool = False) -> str:
        """Per-task table ``task | metric | score % | n`` with macro and micro rows."""
        rows = [
            [t, m, _pct(self.metrics[t][m]), str(int(self.metrics[t]["n"]))] for t, m in self.primary.items()
        ]
        n_total = sum(int(self.metrics[t]["n"]) for t in self.primary)
        rows.append(["macro", "-", _pct(self.macro), str(len(self.primary))])
        rows.append(["micro", "-", _pct(self.micro), str(n_total)])
        return _table(["task", "metric", "score %", "n"], rows, markdown, n_footer=2)

    def __str__(self) -> str:
        return self.format_table()


def _pct(x: float) -> str:
    return "nan" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def _table(header: list[str], rows: list[list[str]], markdown: bool, n_footer: int = 0) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        cells = [str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        return "  ".join(cells).rstrip()

    sep = "  ".join("-" * w for w in widths)
    body = [fmt(r) for r in rows]
    if n_footer:
        body = body[:-n_footer] + [sep] + body[-n_footer:]
    return "\n".join([fmt(header), sep, *body])


def compare_table(before: EvalResult, after: EvalResult, markdown: bool = False) -> str:
    """Before/after table ``task | metric | before % | after % | delta`` with macro and micro rows.

    Tasks are listed in ``after``'s order, then any only in ``before``; a task missing on one side
    shows ``-``.
    """
    tasks = list(after.primary) + [t for t in before.primary if t not in after.primary]
    rows = []
    for t in tasks:
        b = before.score(t) if t in before.primary else None
        a = after.score(t) if t in after.primary else None
        metric = after.primary.get(t) or before.primary[t]
        rows.append([t, metric, _opt_pct(b), _opt_pct(a), _delta(b, a)])
    for name in ("macro", "micro"):
        b, a = getattr(before, name), getattr(after, name)
        rows.append([name, "-", _opt_pct(b), _opt_pct(a), _delta(b, a)])
    return _table(["task", "metric", "before %", "after %", "delta"], rows, markdown, n_footer=2)


def _opt_pct(x: float | None) -> str:
    return "-" if x is None else _pct(x)


def _delta(b: float | None, a: float | None) -> str:
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return "-"
    return f"{100 * (a - b):+.1f}"


# ---------------------------------------------------------------------------------------- scoring


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cpu")


def _cut_at(ids: list[int], stop: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stop:
            return ids[:i]
    return ids


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
) -> list[str]:
    """Greedy-decode a continuation for each example's prompt (batched, left-padded).

    Generations are cut at the first EOS id and only the new tokens are decoded (special tokens
    skipped). Examples are batched by similar prompt length; the output follows the input order.
    """
    dev = torch.device(device) if device is not None else _model_device(model)
    eos, pad = eos_token_id(tokenizer), pad_token_id(tokenizer)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))
    out: list[str] = [""] * len(examples)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
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
        )
        sequences = gen.sequences if hasattr(gen, "sequences") else gen
        new = sequences[:, input_ids.shape[1] :].tolist()
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(_cut_at(new[row], {eos}), skip_special_tokens=True)
        if progress_bar is not None:
            progress_bar.update(1)
    return out


def _option_texts(ex: Example) -> list[str]:
    if ex.option_targets is not None:
        return list(ex.option_targets)
    if ex.options is None:
        raise ValueError(f"task {ex.task!r}: example has no options to score")
    return [" " + o for o in ex.options]


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
    dev = torch.device(device) if device is not None else _model_device(model)
    pad = pad_token_id(tokenizer)
    specials = _special_ids(tokenizer)
    rows: list[tuple[int, int, list[int], int]] = []  # (example, option, ids, first option position)
    for i, ex in enumerate(examples):
        prompt = tokenize_prompt(tokenizer, ex.prompt)
        for j, text in enumerate(_option_texts(ex)):
            opt = tokenize_target(tokenizer, text)
            if not opt:
                raise ValueError(f"task {ex.task!r}, example {i}: option {text!r} tokenizes to nothing")
            p = prompt
            if max_length is not None and len(p) + len(opt) > max_length:
                p = _truncate_left(p, max(1, max_length - len(opt)), _leading_specials(p, specials))
            if not p:
                raise ValueError(
                    f"task {ex.task!r}, example {i}: empty prompt; option scoring needs a prompt token"
                )
            rows.append((i, j, p + opt, len(p)))
    scores: list[list[float]] = [[0.0] * len(_option_texts(ex)) for ex in examples]
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][2]))
    for start in range(0, len(order), batch_size):
        chunk = [rows[r] for r in order[start : start + batch_size]]
        width = max(len(ids) for _, _, ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (_, _, ids, _) in enumerate(chunk):
            input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[r, : len(ids)] = 1
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

    from ..core import distributed

    pairs = _normalize_tasks(tasks)
    rank, world = (distributed.rank(), distributed.world_size()) if shard else (0, 1)
    names = list(task_names)
    for spec, _ in pairs:
        if spec.name not in names:
            raise ValueError(f"task {spec.name!r} is not in task_names {names}")
    total = 0
    for spec, exs in pairs:
        mine = distributed.split_round_robin(exs, rank, world)
        n_rows = len(mine) if spec.type == "generation" else sum(len(_option_texts(e)) for e in mine)
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
                preds = generate_predictions(
                    model,
                    tokenizer,
                    mine,
                    tid,
                    batch_size=batch_size,
                    max_new_tokens=max_new_tokens,
                    device=device,
                    max_length=max_length,
                    progress_bar=bar,
                )
            else:
                option_scores = score_options(
                    model,
                    tokenizer,
                    mine,
                    tid,
                    batch_size=batch_size,
                    device=device,
                    max_length=max_length,
                    progress_bar=bar,
                )
                preds = []
                for ex, sc in zip(mine, option_scores):
                    choices = ex.options if ex.options is not None else [t.strip() for t in _option_texts(ex)]
                    preds.append(choices[max(range(len(sc)), key=sc.__getitem__)])
            if world > 1:
                preds, option_scores = _gathered_in_order(preds, option_scores, len(exs),
                                                          device or _model_device(model))
            refs = [ex.reference for ex in exs]
            assert spec.metric is not None
            task_metrics: dict[str, float] = {}
            for name in dict.fromkeys([spec.metric, *spec.extra_metrics]):
                opts: dict[str, Any] = {}
                if name == "f1" and spec.type == "classification":
                    opts["positive_label"] = spec.resolved_positive_label()
                task_metrics[name] = compute_metric(name, preds, refs, **opts)
            task_metrics["n"] = len(exs)
            metrics[spec.name] = task_metrics
            primary[spec.name] = spec.metric
            for k, (ex, pred, ref) in enumerate(zip(exs, preds, refs)):
                s = score_example(spec.metric, pred, ref)
                rec: dict[str, Any] = {
                    "task": spec.name,
                    "prompt": ex.prompt,
                    "prediction": pred,
                    "reference": ref,
                    "correct": s >= 1.0,
                    "score": s,
                }
                if option_scores is not None:
                    rec["option_logprobs"] = option_scores[k]
                predictions.append(rec)
    finally:
        bar.close()
        if was_training and hasattr(model, "train"):
            model.train()
    return EvalResult(metrics, primary, predictions)


def _gathered_in_order(preds: list[str], scores: list[list[float]] | None, total: int,
                       device: torch.device | str) -> tuple[list[str], list[list[float]] | None]:
    """Every process's predictions (and option scores) for its ``split_round_robin`` share, gathered and put
    back in example order. The payload travels as UTF-8 JSON bytes in a tensor: no pickling."""
    from ..core import distributed

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
