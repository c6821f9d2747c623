"""The two baselines that are not adapter methods (the third, ``peft_lora``, is in :mod:`mtpeft.bench.peft_baseline`).

``untrained``: the base model without adapters (deterministic: one run, whatever the seeds).
``single_task_lora``: one LoRA (the ``lora`` defaults) per training task, trained on that task only, with
``ceil(steps / T)`` steps each (``single_task_steps='split'``: the same total compute as one multi-task run) or
``steps`` each (``'same'``); each task is evaluated with its own adapter. Each finished sub-run is recorded in
``tasks/<task>/subrun.json``, so an interrupted baseline resumes at the next task.
"""

from __future__ import annotations

import copy
import json
import math
import time
from typing import Any

import torch

from ..training.run_config import run_config_from_dict
from .layout import write_json
from .memory import PeakMemory, combined_peak
from .method_run import train_method
from .options import BenchOptions
from .plan import RunSpec
from .scoring import FixedTaskIds, evaluate_unseen, evaluate_with, load_eval_examples
from .suites import entry_name


def run_untrained(spec: RunSpec, options: BenchOptions) -> dict[str, Any]:
    """Evaluate the base model without adapters on the run's tasks and unseen tasks."""
    from ..base_models import load_run_base_model, load_tokenizer
    from ..data.collator import use_chat_template

    cfg = run_config_from_dict(copy.deepcopy(spec.config))
    tokenizer = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    use_chat_template(tokenizer, cfg.data.chat_template)
    base = load_run_base_model(cfg.model)
    device = cfg.train.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.model.quantization is None:  # a quantized model was placed on load and cannot move
        base.to(device)
    base.eval()
    model = FixedTaskIds(base, drop=True)
    tasks = load_eval_examples(cfg.tasks, cfg)
    metrics = evaluate_with(model, tokenizer, tasks, cfg, options.progress)
    unseen, how = evaluate_unseen(
        base, tokenizer, cfg, "untrained", spec.unseen, "", options.unseen_policy, options.progress
    )
    return {
        "tasks": metrics,
        "unseen": unseen,
        "unseen_how": how,
        "steps": 0,
        "final_loss": None,
        "trainable_parameters": 0,
    }


def run_single_task(spec: RunSpec, options: BenchOptions) -> dict[str, Any]:
    """Train and evaluate one LoRA per task; the first task's adapter also evaluates the unseen tasks."""
    entries = spec.config["tasks"]
    steps = int(spec.config["train"]["steps"])
    per_task = math.ceil(steps / len(entries)) if options.single_task_steps == "split" else steps
    names = [entry_name(e) for e in entries]
    tasks: dict[str, Any] = {}
    unseen: dict[str, Any] = {}
    how = ""
    params, peaks, subruns = 0, [], {}
    for i, (entry, name) in enumerate(zip(entries, names)):
        sub_dir = spec.run_dir / "tasks" / name
        marker = sub_dir / "subrun.json"
        config = copy.deepcopy(spec.config)
        config["tasks"] = [copy.deepcopy(entry)]
        config["train"]["steps"] = per_task
        config["output_dir"] = str(sub_dir / "run")
        config["name"] = f"{spec.config['name']}/{name}"
        config = run_config_from_dict(config).to_dict()
        if marker.is_file():
            sub = json.loads(marker.read_text())
        else:
            peak = PeakMemory()
            peak.reset()
            start = time.perf_counter()
            sub = train_method(config, "single_task_lora", spec.unseen if i == 0 else [], options)
            sub["wall_time_s"] = round(time.perf_counter() - start, 2)
            sub["peak_memory"] = peak.read()
            sub["config"] = config
            write_json(marker, sub)
        tasks.update(sub["tasks"])
        if i == 0:
            unseen, how = sub.get("unseen", {}), sub.get("unseen_how", "")
        params += int(sub["trainable_parameters"])
        peaks.append(sub["peak_memory"])
        subruns[name] = {
            "steps": sub["steps"],
            "final_loss": sub["final_loss"],
            "trainable_parameters": sub["trainable_parameters"],
            "wall_time_s": sub["wall_time_s"],
            "run_dir": sub["run_dir"],
        }
    return {
        "tasks": tasks,
        "unseen": unseen,
        "unseen_how": how,
        "steps": per_task * len(entries),
        "steps_per_task": per_task,
        "final_loss": None,
        "trainable_parameters": params,
        "trainable_parameters_per_adapter": params // max(1, len(entries)),
        "subruns": subruns,
        "subrun_peak_memory": combined_peak(peaks),
    }
