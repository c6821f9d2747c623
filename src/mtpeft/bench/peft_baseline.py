"""The ``peft_lora`` baseline: Hugging Face PEFT's LoRA trained by a plain PyTorch loop, as a check on mtpeft's own.

The run config is the ``lora`` run's of the same seed (rank, alpha, dropout, targets, init, optimizer, schedule,
steps, batches), so the two runs differ only in the model side: PEFT injects and computes the adapters, and no
mtpeft adapter code runs. What is shared is everything around the model, so that any score difference comes from
the adapter implementation and not from the setup:

* **The data.** The tasks are loaded, length-screened, mixed (:class:`~mtpeft.data.mixing.MixtureSampler`
  seeded by ``train.seed``) and collated (:class:`~mtpeft.data.collator.MultiTaskCollator`) by the same calls as
  :class:`~mtpeft.training.trainer.MultiTaskTrainer` makes, so every optimizer step sees the same examples in the
  same order as the ``lora`` run's. The rows are always padded, one example each: ``data.packing`` changes how
  the ``lora`` run lays out the same examples, not which examples it sees nor its loss.
* **The targets.** mtpeft's target spec (``all-linear``, suffix lists, regexes, ``exclude_modules``,
  ``layers_to_transform``) is resolved to the concrete module names, which PEFT is given as its target list, so
  both adapt exactly the same linears.
* **The loss.** The causal-LM cross-entropy computed here from the model's logits: the mean over the labelled
  (next-token) positions of each micro-batch, as mtpeft's loss is; with ``grad_accum`` micro-batches each
  contributes its mean / ``grad_accum``, as in the trainer.
* **The optimizer.** AdamW over the trainable parameters with ``train.lr`` and ``train.weight_decay``, the same
  warmup and schedule (:func:`~mtpeft.training.optim.build_scheduler`), gradient clipping at
  ``train.max_grad_norm``.
* **The evaluation.** :func:`~mtpeft.bench.scoring.evaluate_with` (generation with the tasks' stop strings,
  option log-likelihoods), so the per-item scores pair with every other run's.

The initial A differs from the ``lora`` run's draw (PEFT draws its own; both Kaiming-uniform, B = 0), so two
runs of one seed are two samples of the same training, not a replay. No checkpoints: an interrupted run
starts over. A non-finite loss or gradient stops the run, whatever ``train.nan_policy`` says.
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BenchError
from ..training.run_config import RunConfig, method_config_for, run_config_from_dict
from .options import BenchOptions
from .plan import RunSpec
from .scoring import FixedTaskIds, evaluate_unseen, evaluate_with, load_eval_examples

#: The name of this baseline in the bench.
PEFT_LORA = "peft_lora"

_IGNORE = -100


def adapted_module_names(base: nn.Module, method_cfg: Any) -> list[str]:
    """The full names of the linears mtpeft's ``lora`` would adapt in ``base`` (its target matching)."""
    from ..core.targets import find_target_linears

    return find_target_linears(base, method_cfg)


def lora_config(base: nn.Module, method_cfg: Any) -> Any:
    """A PEFT ``LoraConfig`` equal to mtpeft's LoRA config ``method_cfg`` on ``base`` (a one-line BenchError for
    options PEFT is not given here)."""
    from peft import LoraConfig

    from ..core.targets import is_conv1d

    if getattr(method_cfg, "init_from_weights", None):
        raise BenchError(f"{PEFT_LORA}: method.init_from_weights={method_cfg.init_from_weights!r} is not supported")
    if method_cfg.modules_to_save:
        raise BenchError(f"{PEFT_LORA}: method.modules_to_save={method_cfg.modules_to_save!r} is not supported")
    names = adapted_module_names(base, method_cfg)
    return LoraConfig(
        r=method_cfg.r,
        lora_alpha=method_cfg.alpha,
        lora_dropout=method_cfg.dropout,
        target_modules=names,
        use_rslora=method_cfg.use_rslora,
        use_dora=bool(getattr(method_cfg, "use_dora", False)),
        init_lora_weights=True if method_cfg.init == "kaiming" else "gaussian",  # PEFT: Kaiming-uniform A, B = 0
        fan_in_fan_out=any(is_conv1d(base.get_submodule(n)) for n in names),
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_peft_model(base: nn.Module, method_cfg: Any) -> Any:
    """``base`` with PEFT LoRA adapters on mtpeft's target linears (the base frozen by PEFT)."""
    from peft import get_peft_model

    return get_peft_model(base, lora_config(base, method_cfg))


def peft_adapted_names(model: Any) -> list[str]:
    """The base-model names of the modules PEFT put a LoRA layer on (for comparing with mtpeft's)."""
    from peft.tuners.lora import LoraLayer

    inner = model.get_base_model()
    return [n for n, m in inner.named_modules() if isinstance(m, LoraLayer)]


@dataclass
class TrainingData:
    """The data side of a run as the trainer builds it: tasks after length screening, their names, the collator,
    the mixing sampler and the training examples per task."""

    tasks: list[Any]
    task_names: list[str]
    collator: Any
    sampler: Any
    examples: list[list[Any]]
    lengths: dict[str, Any]

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The collated next micro-batch of the sampler's stream."""
        from ..data.mixing import batch_examples

        return self.collator(batch_examples(self.sampler.next_batch(), self.examples))


def training_data(cfg: RunConfig, tokenizer: Any) -> TrainingData:
    """The tasks, collator and sampler of ``cfg``, made by the same calls as ``MultiTaskTrainer.__init__`` (one
    process), so the stream of examples equals a ``lora`` run's of the same config (in padded rows, whatever
    ``data.packing`` says)."""
    from ..data.collator import MultiTaskCollator
    from ..data.lengths import screen_lengths
    from ..data.mixing import MixtureSampler
    from ..data.resolve import resolve_task_specs
    from ..data.tasks import load_tasks

    loaded = [(data.spec, data) for data in load_tasks(resolve_task_specs(cfg), cfg.data.root)]
    empty = [spec.name for spec, data in loaded if not data.train]
    if empty:
        raise BenchError(f"task {empty[0]!r} has no training examples")
    tasks, lengths = screen_lengths(loaded, tokenizer, cfg.data.max_length, cfg.data.truncation)
    names = [spec.name for spec, _ in tasks]
    collator = MultiTaskCollator(tokenizer, names, max_length=cfg.data.max_length, truncation=cfg.data.truncation)
    sampler = MixtureSampler([len(d.train) for _, d in tasks], cfg.train.batch_size, strategy=cfg.data.mixing,
                             temperature=cfg.data.temperature, task_balanced=cfg.data.task_balanced,
                             seed=cfg.train.seed)
    return TrainingData(tasks, names, collator, sampler, [d.train for _, d in tasks], lengths)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions (fp32 or wider): position t predicts label t+1."""
    logits = logits[:, :-1]
    targets = labels[:, 1:].to(logits.device)
    keep = targets != _IGNORE
    picked = logits[keep]
    picked = picked.to(torch.promote_types(picked.dtype, torch.float32))
    total = F.cross_entropy(picked, targets[keep], reduction="sum")
    return total / max(int(keep.sum()), 1)


def train_peft(model: Any, cfg: RunConfig, data: TrainingData, device: torch.device,
               log_path: Path | None = None) -> list[dict[str, Any]]:
    """``train.steps`` AdamW steps of ``model``'s trainable parameters on ``data``'s batches -> one record per
    step (``step``, ``loss``: the mean of its micro-batch losses, ``lr``, ``tokens``)."""
    from ..training.optim import build_scheduler

    train = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": params, "lr": train.lr, "weight_decay": train.weight_decay}],
                                  lr=train.lr)
    scheduler = build_scheduler(optimizer, train)
    bf16 = train.precision == "bf16"
    history: list[dict[str, Any]] = []
    model.train()
    for step in range(train.steps):
        losses, tokens = [], 0
        for _ in range(train.grad_accum):
            batch = {k: v.to(device) for k, v in data.next_batch().items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = causal_lm_loss(logits, batch["labels"])
            if not torch.isfinite(loss):
                raise BenchError(f"{PEFT_LORA}: non-finite loss {float(loss)} at step {step}")
            (loss / train.grad_accum).backward()
            losses.append(float(loss.detach()))
            tokens += int(batch["attention_mask"].sum())
        if train.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
            if not torch.isfinite(norm):
                raise BenchError(f"{PEFT_LORA}: non-finite gradient norm {float(norm)} at step {step}")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step + 1, "loss": float(np.mean(losses)), "lr": scheduler.get_last_lr()[0],
                  "tokens": tokens}
        history.append(record)
        if log_path is not None:
            with open(log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
    return history


def run_peft_lora(spec: RunSpec, options: BenchOptions, base_model: nn.Module | None = None) -> dict[str, Any]:
    """Train PEFT's LoRA on the run config (the ``lora`` run's of this seed) and evaluate it on the run's tasks
    and unseen tasks -> the run's result fields. ``base_model`` replaces loading the config's model."""
    from ..base_models import load_run_base_model, load_tokenizer
    from ..data.collator import use_chat_template

    cfg = run_config_from_dict(copy.deepcopy(spec.config))
    if cfg.model.quantization is not None:
        raise BenchError(f"{PEFT_LORA}: model.quantization={cfg.model.quantization!r} is not supported")
    tokenizer = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    use_chat_template(tokenizer, cfg.data.chat_template)
    data = training_data(cfg, tokenizer)
    method_cfg = method_config_for(cfg, data.task_names)
    if method_cfg.method != "lora":
        raise BenchError(f"{PEFT_LORA}: method must be 'lora', got {method_cfg.method!r}")
    torch.manual_seed(cfg.train.seed)  # as the trainer seeds before building its model
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    base = base_model if base_model is not None else load_run_base_model(cfg.model)
    device = torch.device(cfg.train.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base.to(device)
    model = build_peft_model(base, method_cfg)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "metrics.jsonl"
    log_path.unlink(missing_ok=True)  # a run that was interrupted starts over
    start = time.perf_counter()
    history = train_peft(model, cfg, data, device, log_path)
    elapsed = max(time.perf_counter() - start, 1e-9)
    model.save_pretrained(out_dir / "adapter")
    model.eval()
    tasks = load_eval_examples(cfg.tasks, cfg)
    metrics = evaluate_with(FixedTaskIds(model, drop=True), tokenizer, tasks, cfg, options.progress)
    unseen, how = evaluate_unseen(model, tokenizer, cfg, PEFT_LORA, spec.unseen, data.task_names[0],
                                  options.unseen_policy, options.progress)
    from peft import __version__ as peft_version

    return {
        "tasks": metrics,
        "unseen": unseen,
        "unseen_how": how,
        "steps": len(history),
        "final_loss": history[-1]["loss"] if history else None,
        "tokens_per_s": sum(r["tokens"] for r in history) / elapsed,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "adapted_modules": len(peft_adapted_names(model)),
        "peft_version": peft_version,
        "run_dir": str(out_dir),
    }
