"""An MTModel trains inside the stock transformers.Trainer with a task_ids column (examples/hf_trainer.py)."""

from __future__ import annotations

import importlib.util

import torch
from conftest import REPO


def test_examples_hf_trainer_trains_only_adapters(tiny_model_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("hf_trainer_example", REPO / "examples" / "hf_trainer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    trainer = module.build(str(tiny_model_dir), str(tmp_path / "out"), max_steps=3)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = next(iter(trainer.get_train_dataloader()))
    assert "task_ids" in batch and batch["task_ids"].shape == batch["input_ids"].shape[:1]
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    trainable = {n for n, _ in model.trainable_parameters()}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
