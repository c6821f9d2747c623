"""Per-task training loss for ``metrics.jsonl``: each task's token-mean loss over the rows of a step.

The model's loss is one number over the whole (mixed) batch, auxiliary losses included; :class:`TaskLosses`
splits the language-model loss by task, without gradients and without another forward pass, on the steps that
are logged only. From the forward's logits when it returns them; when it does not (``train.loss_chunk_size``:
the loss is computed in chunks from the decoder's hidden states, without logits), from those hidden states,
caught by a forward hook on the decoder and passed through the output head again in small blocks. In packed
rows (``data.packing``) every token counts for its own example's task. Under data parallelism each process sees
its own rows: the main process logs its share.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

#: The key prefix of the per-task losses in a metrics record (``task_loss/<task>``).
TASK_LOSS_PREFIX = "task_loss/"
#: Rows of hidden states passed through the output head at a time (bounds the logits block in memory).
HEAD_BLOCK_ROWS = 256
_HOOK_ATTR = "_mtpeft_task_loss_hook"


class TaskLosses:
    """Sums of per-task token losses and token counts over a step's micro-batches.

    Args:
        task_names: the run's task order (``batch["task_ids"]`` indexes into it).
        train: the run config's train section (``log_every``, ``steps``).
        step: the optimizer step being made (1-based); nothing is computed unless that step is logged.
        base_model: the transformers causal LM under the adapters; its decoder's hidden states give the losses of
            forwards that return no logits (None: such micro-batches are left out).
    """

    def __init__(self, task_names: Sequence[str], train: Any = None, step: int = 0, base_model: Any = None) -> None:
        self.task_names = list(task_names)
        every = getattr(train, "log_every", 1) if train is not None else 1
        last = getattr(train, "steps", None) if train is not None else None
        self.active = bool(every) and (step % every == 0 or step == last)
        self.sums: dict[str, float] = {}
        self.tokens: dict[str, int] = {}
        self.hidden: torch.Tensor | None = None
        self.head: Any = None
        decoder = _decoder(base_model)
        old = getattr(decoder, _HOOK_ATTR, None)
        if old is not None:  # a step that was skipped never removed its hook
            old.remove()
        if self.active and decoder is not None:
            self.head = base_model.get_output_embeddings()
            self._hook = decoder.register_forward_hook(self._catch)
            setattr(decoder, _HOOK_ATTR, self._hook)

    def _catch(self, module: Any, args: Any, output: Any) -> None:
        first = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", None)
        self.hidden = first.detach() if isinstance(first, torch.Tensor) else None

    def add(self, out: Any, batch: dict[str, torch.Tensor]) -> Any:
        """Count one micro-batch's forward output ``out``; returns ``out`` (so that it wraps the forward call)."""
        hidden, self.hidden = self.hidden, None
        if not self.active or "task_ids" not in batch or "labels" not in batch:
            return out
        try:
            per_token = self._token_losses(getattr(out, "logits", None), hidden, batch["labels"])
        except Exception as exc:  # a measurement never stops training
            warnings.warn(f"per-task loss not measured: {type(exc).__name__}: {exc}", stacklevel=2)
            return out
        if per_token is not None:
            self._count(batch["task_ids"], batch["labels"][:, 1:] != -100, per_token)
        return out

    def _token_losses(self, logits: Any, hidden: Any, labels: torch.Tensor) -> torch.Tensor | None:
        """Each target token's loss (batch, seq - 1), 0 where there is none, from the logits or else from the
        decoder's hidden states."""
        targets = labels[:, 1:]
        with torch.no_grad():
            if isinstance(logits, torch.Tensor) and logits.dim() == 3 and logits.shape[1] == labels.shape[1]:
                flat = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                       targets.reshape(-1).to(logits.device), ignore_index=-100, reduction="none")
                return flat.view(targets.shape).cpu()
            if hidden is None or self.head is None or hidden.dim() != 3 or hidden.shape[:2] != labels.shape:
                return None
            targets = targets.to(hidden.device)
            keep = targets != -100
            h, y = hidden[:, :-1][keep], targets[keep]
            losses = torch.cat([F.cross_entropy(self.head(h[i:i + HEAD_BLOCK_ROWS]).float(), y[i:i + HEAD_BLOCK_ROWS],
                                                reduction="none") for i in range(0, len(y), HEAD_BLOCK_ROWS)]
                               or [h.new_zeros(0)])
            out = torch.zeros(targets.shape, device=losses.device)
            out[keep.to(losses.device)] = losses.float()
            return out.cpu()

    def _count(self, task_ids: torch.Tensor, targets: torch.Tensor, per_token: torch.Tensor) -> None:
        """Add the target tokens' losses to their tasks: a row's task for per-sample ids (batch,), the token's
        own for per-token ids (batch, seq) of packed rows."""
        targets = targets.cpu()
        ids = task_ids.cpu()
        ids = ids[:, None].expand_as(targets) if ids.dim() == 1 else ids[:, 1:]
        ids, losses = ids[targets], per_token[targets].double()
        for tid in torch.unique(ids).tolist():
            chosen = ids == tid
            name = self.task_names[tid] if 0 <= tid < len(self.task_names) else str(tid)
            self.sums[name] = self.sums.get(name, 0.0) + float(losses[chosen].sum())
            self.tokens[name] = self.tokens.get(name, 0) + int(chosen.sum())

    def record(self) -> dict[str, float]:
        """``{"task_loss/<task>": token-mean loss}`` for the tasks seen (empty on steps that are not logged);
        the decoder hook of this step is removed."""
        hook = getattr(self, "_hook", None)
        if hook is not None:
            hook.remove()
        return {f"{TASK_LOSS_PREFIX}{t}": self.sums[t] / self.tokens[t] for t in sorted(self.sums) if self.tokens[t]}


def _decoder(base_model: Any) -> Any:
    get = getattr(base_model, "get_decoder", None)
    try:
        return get() if callable(get) and base_model.get_output_embeddings() is not None else None
    except (AttributeError, NotImplementedError, TypeError):
        return None


def for_step(trainer: Any) -> TaskLosses:
    """The per-task losses of the step a trainer is about to make (its ``task_names``, ``cfg.train``,
    ``loop.step`` and the base model under ``model``)."""
    sharded = getattr(getattr(trainer, "engine", None), "sharded", False)  # the head's weights are sharded there
    base = None if sharded else getattr(trainer.model, "base_model", None)
    return TaskLosses(trainer.task_names, trainer.cfg.train, trainer.loop.step + 1, base)
