"""An MTModel trains inside the stock transformers.Trainer with a task_ids column (examples/hf_trainer.py), and
Trainer checkpoints, resumes and evaluates it with default TrainingArguments, saving only the adapter."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import REPO, TASKS
from safetensors.torch import load_file

import mtpeft


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


def _tiny_llama(tied: bool) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            tie_word_embeddings=tied)
    return tf.LlamaForCausalLM(config)


def _rows(n: int, seed: int) -> list[dict[str, list[int] | int]]:
    """Pre-tokenized rows as a datasets user has them: input_ids, attention_mask, labels and a task_ids column
    (plus a text column the model does not take, which Trainer drops)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(3, 97, (8,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * 8, "labels": [-100] * 3 + ids[3:],
                     "task_ids": i % len(TASKS), "text": f"row {i}"})
    return rows


def _trainer(tmp_path, tied: bool, max_steps: int):
    from transformers import Trainer, TrainingArguments

    model = mtpeft.get_mt_model(_tiny_llama(tied), {"method": "mtl_lora", "tasks": TASKS, "r": 4})
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=max_steps, save_steps=2)
    return Trainer(model=model, args=args, train_dataset=_rows(32, 0), eval_dataset=_rows(8, 1))


@pytest.mark.parametrize("tied", [True, False])
def test_stock_trainer_checkpoints_resumes_and_evaluates_only_the_adapter(tmp_path, tied):
    full = _trainer(tmp_path / "full", tied, max_steps=4)
    full.train()
    checkpoint = tmp_path / "full" / "out" / "checkpoint-2"
    saved = load_file(str(checkpoint / "model.safetensors"))
    adapter_keys = {f"base_model.{k}" for k in full.model.adapter_state_dict()}
    assert set(saved) == adapter_keys  # the adapter only: no frozen base weight, no shared embedding tensor
    # resuming from step 2 ends where the uninterrupted run ends
    resumed = _trainer(tmp_path / "resumed", tied, max_steps=4)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for key, value in full.model.adapter_state_dict().items():
        torch.testing.assert_close(resumed.model.adapter_state_dict()[key], value, msg=key)
    metrics = resumed.evaluate()
    assert "eval_loss" in metrics and torch.isfinite(torch.tensor(metrics["eval_loss"]))


def test_readme_trainer_section_runs_as_written(tiny_model_dir, tmp_path, monkeypatch):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### With `transformers.Trainer`"):]
    code = section[section.index("```python") + len("```python"):]
    code = code[:code.index("```")]
    assert "remove_unused_columns" not in code and "label_names" not in code  # the defaults
    code = code.replace('"smollm2"', repr(str(tiny_model_dir))).replace("max_steps=30, save_steps=10",
                                                                        "max_steps=2, save_steps=1")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own snippet
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    checkpoint = load_file(str(tmp_path / "out" / "checkpoint-2" / "model.safetensors"))
    assert set(checkpoint) == {f"base_model.{k}" for k in namespace["model"].adapter_state_dict()}
