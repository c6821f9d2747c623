"""A method's run: trained by :class:`mtpeft.training.trainer.MultiTaskTrainer` (which evaluates every training task at
the end), then evaluated on the unseen tasks under the unseen-task policy."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ..training.run_config import run_config_from_dict
from .options import BenchOptions
from .scoring import evaluate_unseen, task_metrics_dict


def train_method(config: dict[str, Any], method: str, unseen: list[Any], options: BenchOptions) -> dict[str, Any]:
    """Train the run config ``config`` (resuming its checkpoints) and evaluate it -> the run's result fields."""
    from ..training.trainer import MultiTaskTrainer

    cfg = run_config_from_dict(copy.deepcopy(config))
    if cfg.train.compile:
        import torch

        # dynamo keeps at most 8 graphs per code object (the decoder's forward, shared by every run of this
        # process), so the runs after the first few would train eager; the earlier runs' models are gone
        torch._dynamo.reset()
    trainer = MultiTaskTrainer(cfg, progress=options.progress)
    result = trainer.train(resume=True)
    tasks = task_metrics_dict(result.eval) if result.eval is not None else {}
    unseen_metrics, how = evaluate_unseen(
        trainer.model,
        trainer.tokenizer,
        cfg,
        method,
        unseen,
        trainer.task_names[0],
        options.unseen_policy,
        options.progress,
    )
    history = result.history[-1] if result.history else {}
    return {
        "tasks": tasks,
        "unseen": unseen_metrics,
        "unseen_how": how,
        "steps": result.steps,
        "final_loss": result.final_loss,
        "tokens_per_s": history.get("tokens_per_s"),
        "trainable_parameters": trainer.model.num_trainable_parameters(),
        "run_dir": str(Path(cfg.output_dir)),
    }
