"""Train an mtpeft adapter with the stock `transformers.Trainer`: `task_ids` is just another batch column.

    python examples/hf_trainer.py --model smollm2 --out runs/hf-trainer

Uses the built-in demo tasks. The dataset rows are examples; the collator turns them into input_ids,
attention_mask, labels and a `task_ids` column, which the Trainer passes to MTModel.forward.
"""

from __future__ import annotations

import argparse

from transformers import Trainer, TrainingArguments

import mtpeft
from mtpeft.base_models import load_base_model, load_tokenizer
from mtpeft.data.builtin import demo_tasks
from mtpeft.data.collator import MultiTaskCollator


def build(model_name: str, output_dir: str, max_steps: int = 30, method: str = "mtl_lora") -> Trainer:
    """A Trainer over the demo tasks with an mtpeft model; rows carry a `task_ids` column."""
    tokenizer = load_tokenizer(model_name)
    tasks = demo_tasks(n_train=64, n_eval=8)
    names = [spec.name for spec, _ in tasks]
    collator = MultiTaskCollator(tokenizer, names, max_length=64)
    rows = [example for _, data in tasks for example in data.train]
    model = mtpeft.get_mt_model(load_base_model(model_name), {"method": method, "tasks": names, "r": 8})
    eval_rows = [example for _, data in tasks for example in data.eval]
    # Trainer's defaults work: forward names the columns it keeps, and checkpoints hold only the adapter.
    args = TrainingArguments(output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=8,
                             learning_rate=1e-3, logging_steps=5, save_steps=10, report_to=[], use_cpu=True)
    return Trainer(model=model, args=args, train_dataset=rows, eval_dataset=eval_rows, data_collator=collator)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--out", default="runs/hf-trainer")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    trainer = build(args.model, args.out, args.steps)
    trainer.train()
    print(f"eval_loss: {trainer.evaluate()['eval_loss']:.4f}")
    trainer.model.save_pretrained(f"{args.out}/adapter")
    print(f"adapter saved to {args.out}/adapter")
