"""The training loop on accelerate: mixed-task batches, checkpoints written atomically, exact resume.

The trainer never knows a method by name: it sees ``out.loss``, ``out.aux_losses``, ``model.param_groups``,
``model.needs_calibration`` and ``model.set_global_step``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..core import distributed
from ..data.collator import MultiTaskCollator
from ..data.mixing import MixtureSampler
from ..data.tasks import Example, TaskData, TaskSpec, load_task
from ..errors import TrainingError, TrainingInterrupted
from ..io.atomic import atomic_write_dir
from ..model import MTModel, get_mt_model
from . import engines
from .run_config import RunConfig

CHECKPOINTS = "checkpoints"
# Fault-injection aid for the kill/resume tests: seconds to sleep after each optimizer step.
STEP_DELAY_ENV = "MTPEFT_STEP_DELAY_S"
# nan_policy=skip: this many skipped batches in a row stop the run (the weights themselves are broken).
MAX_CONSECUTIVE_SKIPS = 20


# --- tasks --------------------------------------------------------------------------------------------
def resolve_task_specs(cfg: RunConfig) -> list[TaskSpec]:
    """Turn the run config's task entries (preset names or mappings) into task specs, in order."""
    root = cfg.data.root
    specs: list[TaskSpec] = []
    for i, entry in enumerate(cfg.tasks):
        if isinstance(entry, str) and (entry == "demo" or entry.startswith("demo:")):
            from ..data.builtin import demo_specs

            names = entry.split(":", 1)[1].split(",") if ":" in entry else None
            found = demo_specs(seed=cfg.train.seed, names=names)
        elif isinstance(entry, str):
            from ..data.presets import preset

            found = preset(entry, root)
        else:
            try:
                found = [TaskSpec.from_dict(entry)]
            except (TypeError, ValueError) as exc:
                raise ValueError(f"tasks[{i}]: {exc}") from exc
        specs.extend(found)
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate task names in the run config: {dup}")
    for spec in specs:
        if cfg.data.max_train_per_task is not None:
            spec.max_train = min(spec.max_train or cfg.data.max_train_per_task, cfg.data.max_train_per_task)
        if cfg.data.max_eval_per_task is not None:
            spec.max_eval = min(spec.max_eval or cfg.data.max_eval_per_task, cfg.data.max_eval_per_task)
    return specs


def method_config_for(cfg: RunConfig, task_names: list[str]) -> Any:
    """The validated adapter config of a run, with its resolved task list."""
    from ..config import ConfigError, config_from_dict

    try:
        return config_from_dict({**cfg.method, "tasks": task_names})
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"method: {exc}") from exc


def load_tasks(specs: list[TaskSpec], data_root: str | None) -> list[tuple[TaskSpec, TaskData]]:
    """Load every task's train and eval examples; an empty training set is an error naming the task."""
    out = []
    for spec in specs:
        data = load_task(spec, data_root)
        if not data.train:
            raise ValueError(f"task {spec.name!r} has no training examples")
        out.append((spec, data))
    return out


# --- optimizer / RNG state without pickle -------------------------------------------------------------
def _optimizer_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    np_state = np.random.get_state()
    meta = {"python": _jsonable(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    random.setstate(_tupled(meta["python"]))
    np_state = meta["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


# --- checkpoints --------------------------------------------------------------------------------------
def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (partial writes are hidden dot-folders and never listed)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
             and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of ``step`` lives."""
    return Path(output_dir) / CHECKPOINTS / f"step-{step:07d}"


def save_checkpoint(output_dir: str | os.PathLike, step: int, model: MTModel, optimizer_state: dict[str, Any],
                    scheduler: Any, sampler_state: dict[str, Any], rng: tuple[dict, dict],
                    extra: dict[str, Any], keep: int = 2,
                    adapter_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint ``step-N`` atomically (adapter, optimizer, scheduler, RNG, data position).

    ``optimizer_state`` is an ``Optimizer.state_dict()`` with whole tensors and ``adapter_state`` the whole
    adapter tensors (default: the model's own); :mod:`mtpeft.training.engines` gathers both from sharded runs.
    """
    target = checkpoint_path(output_dir, step)
    opt_tensors, opt_meta = _optimizer_to_files(optimizer_state)
    rng_tensors, rng_meta = rng

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp / "adapter", state_dict=adapter_state)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        state = {"step": step, "sampler": sampler_state, "scheduler": scheduler.state_dict(),
                 "optimizer": opt_meta, "rng": rng_meta, **extra}
        (tmp / "trainer_state.json").write_text(json.dumps(state, default=_json_default))

    try:
        atomic_write_dir(target, write)
    except (OSError, ValueError) as exc:  # disk full, permissions; a non-finite adapter is refused
        previous = checkpoint_dirs(output_dir)
        last = str(previous[-1]) if previous else "none"
        raise TrainingError(f"could not write checkpoint {target}: {exc}. The last good checkpoint ({last}) is "
                            f"intact; free space or fix permissions and resume with --resume") from exc
    for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _logged_step(line: str) -> float:
    """The step of a metrics-log line; a torn or empty line (a kill mid-write) counts as never logged."""
    try:
        return float(json.loads(line).get("step", math.inf))
    except (json.JSONDecodeError, AttributeError):
        return math.inf


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


# --- the loop -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) until the block ends, then raise KeyboardInterrupt (main thread only)."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    pending: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pending:
        raise KeyboardInterrupt


@dataclass
class TrainResult:
    """What a run produced."""

    output_dir: Path
    steps: int
    final_loss: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    eval: Any = None
    eval_before: Any = None
    skipped_batches: int = 0
    is_main_process: bool = True  # under data parallelism only the main process saves, evaluates and reports


def _scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig) -> Any:
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.train.schedule]
    warmup = int(math.ceil(cfg.train.warmup_ratio * cfg.train.steps))
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=cfg.train.steps)


def _calibration_batches(tasks: list[tuple[TaskSpec, TaskData]], collator: MultiTaskCollator,
                         batch_size: int, per_task: int) -> list[dict[str, torch.Tensor]]:
    batches = []
    for _, data in tasks:
        for b in range(per_task):
            chunk = data.train[b * batch_size:(b + 1) * batch_size]
            if chunk:
                batches.append(collator(chunk))
    return batches


class Trainer:
    """Train one run config. ``model``/``tokenizer``/``tasks`` may be given to skip loading them."""

    def __init__(self, cfg: RunConfig, *, model: MTModel | None = None, tokenizer: Any = None,
                 tasks: list[tuple[TaskSpec, TaskData]] | None = None, progress: bool = True,
                 base_model: Any = None) -> None:
        from ..base_models import load_run_base_model, load_tokenizer

        self.cfg = cfg
        self.progress = progress
        self.output_dir = Path(cfg.output_dir)
        self.tokenizer = tokenizer or load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
        self.tasks = tasks if tasks is not None else load_tasks(resolve_task_specs(cfg), cfg.data.root)
        self.task_names = [spec.name for spec, _ in self.tasks]
        method_cfg = method_config_for(cfg, self.task_names)  # fail before the model is loaded
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        if model is None:
            base = base_model if base_model is not None else load_run_base_model(cfg.model)
            model = get_mt_model(base, method_cfg)
        self.model = model
        self.model.loss_chunk_size = cfg.train.loss_chunk_size
        if cfg.model.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.collator = MultiTaskCollator(self.tokenizer, self.task_names, max_length=cfg.data.max_length,
                                          truncation=cfg.data.truncation)
        self.sampler = MixtureSampler([len(d.train) for _, d in self.tasks], cfg.train.batch_size,
                                      strategy=cfg.data.mixing, temperature=cfg.data.temperature,
                                      task_balanced=cfg.data.task_balanced, seed=cfg.train.seed)

    # helpers
    def _examples(self, batch: list[tuple[int, int]]) -> list[Example]:
        return [self.tasks[t][1].train[i] for t, i in batch]

    def eval_sets(self) -> list[tuple[TaskSpec, list[Example]]]:
        return [(spec, data.eval) for spec, data in self.tasks if data.eval]

    def evaluate(self, device: torch.device | None = None, progress: bool | None = None, shard: bool = False) -> Any:
        """Per-task evaluation of the current model on every task's eval split (``shard``: see ``evaluate``)."""
        from ..evaluation.evaluator import evaluate

        sets = self.eval_sets()
        if not sets:
            return None
        return evaluate(self.model, self.tokenizer, sets, self.task_names, batch_size=self.cfg.eval.batch_size,
                        max_new_tokens=self.cfg.eval.max_new_tokens, device=device,
                        progress=self.progress if progress is None else progress, shard=shard)

    def train(self, resume: bool = False) -> TrainResult:
        """Run the loop; with ``resume`` continue from the latest complete checkpoint in the output folder."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs
        from tqdm.auto import tqdm

        cfg = self.cfg
        cpu = cfg.train.device == "cpu" or (cfg.train.device is None and not torch.cuda.is_available())
        # Task-indexed weights of tasks missing from one process's shard get no gradient there.
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        accelerator = Accelerator(mixed_precision="bf16" if cfg.train.precision == "bf16" else "no", cpu=cpu,
                                  kwargs_handlers=[ddp])
        device = accelerator.device
        try:
            engine = engines.engine_of(accelerator)
        except engines.EngineError as exc:
            raise TrainingError(str(exc)) from None
        world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
        if world > 1 and cfg.train.batch_size < world:
            raise TrainingError(f"train.batch_size ({cfg.train.batch_size}) is the global batch and must be at "
                                f"least the number of processes ({world})")
        if engine.sharded and cfg.model.quantization:
            raise TrainingError(f"model.quantization={cfg.model.quantization} is not supported under "
                                f"{engine.describe()}: train a quantized base with data parallelism "
                                f"(examples/accelerate/ddp.yaml), where each process holds its own 4-bit copy")
        if engine.deepspeed and cfg.train.nan_policy == "skip" and cfg.train.grad_accum > 1:
            # DeepSpeed accumulates micro-batches in buffers of its own that cannot be emptied mid-step.
            raise TrainingError("train.nan_policy=skip needs train.grad_accum=1 under DeepSpeed; set one of them "
                                "differently (nan_policy=stop, or no accumulation)")
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.output_dir / "run_config.yaml")
        model = self.model.to(device)

        checkpoints = checkpoint_dirs(self.output_dir) if resume else []
        start_step = 0
        if not resume and checkpoint_dirs(self.output_dir):
            raise TrainingError(f"{self.output_dir} already has checkpoints: pass --resume to continue that run, "
                                f"or choose another output_dir")
        accelerator.wait_for_everyone()  # every process has checked the folder before anyone writes to it
        result = TrainResult(self.output_dir, 0, None)
        if cfg.eval.before_training and not checkpoints:
            model.eval()  # not sharded yet under any engine: each process evaluates its share of the examples
            result.eval_before = self.evaluate(device, progress=self.progress and main, shard=True)
        if model.needs_calibration and not checkpoints:
            batches = _calibration_batches(self.tasks, self.collator, cfg.train.batch_size,
                                           cfg.train.calibration_batches)
            model.calibrate([{k: v.to(device) for k, v in b.items()} for b in batches])

        optimizer = torch.optim.AdamW(model.param_groups(cfg.train.lr, cfg.train.weight_decay), lr=cfg.train.lr)
        # DeepSpeed replaces the groups' parameters by flat partitions: remember which is which
        optimized = [p for group in optimizer.param_groups for p in group["params"]]
        group_sizes = [len(group["params"]) for group in optimizer.param_groups]
        scheduler = _scheduler(optimizer, cfg)
        saved_optimizer = None
        if checkpoints:
            start_step, saved_optimizer = self._load_checkpoint(checkpoints[-1], model, scheduler)
        if world > 1:  # the same seed everywhere would give every process the same dropout masks
            torch.manual_seed(cfg.train.seed + 1_000_003 * rank + start_step)
        if engine.deepspeed:
            engines.configure_deepspeed(accelerator, global_batch=cfg.train.batch_size,
                                        grad_accum=cfg.train.grad_accum, max_grad_norm=cfg.train.max_grad_norm)
        prepared, optimizer = accelerator.prepare(model, optimizer)
        if saved_optimizer is not None:
            engines.load_optimizer_state(optimizer, optimized, saved_optimizer, engine)
        deepspeed_engine = accelerator.deepspeed_engine_wrapped.engine if engine.deepspeed else None

        def log(path: Path, record: dict[str, Any]) -> None:
            if main:
                self._log(path, record)

        last_saved: dict[str, Any] = {}

        def save(state, barrier: bool = True) -> Path:
            path = checkpoint_path(self.output_dir, step)
            if main or engine.sharded:
                # a collective under FSDP and DeepSpeed: every process takes part, the main process writes
                adapter_state = engines.gather_adapter_state(model, engine)
                optimizer_state = engines.gather_optimizer_state(optimizer, optimized, group_sizes, engine)
                if main:
                    last_saved["adapter"] = adapter_state
                    path = self._save(step, model, adapter_state, optimizer_state, scheduler, state)
            if barrier:  # no process runs ahead of a checkpoint it may resume from
                accelerator.wait_for_everyone()
            return path

        def evaluate_all() -> Any:
            # Every process takes part and the main process reports. Under data parallelism each evaluates its
            # share of the examples; a sharded model (FSDP, ZeRO) runs only when every process runs it, so
            # there all evaluate every example in lockstep.
            return self.evaluate(device, progress=self.progress and main, shard=not engine.sharded)

        log_path = self.output_dir / "metrics.jsonl"
        if main and not checkpoints and log_path.exists():
            log_path.unlink()
        elif main and checkpoints and log_path.exists():  # drop lines a killed run logged after its last checkpoint
            kept = [ln for ln in log_path.read_text().splitlines() if _logged_step(ln) <= start_step]
            log_path.write_text("".join(ln + "\n" for ln in kept))
        bar = tqdm(total=cfg.train.steps, initial=start_step, disable=not (self.progress and main), desc="train",
                   dynamic_ncols=True)
        step = start_step
        step_state = (self.sampler.state_dict(), _rng_state())
        consecutive_skips = 0
        last_loss: float | None = None
        tokens, t0 = 0, time.perf_counter()
        try:
            while step < cfg.train.steps:
                step_state = (self.sampler.state_dict(), _rng_state())
                prepared.train()
                model.set_global_step(step)
                losses, aux_sums, tasks_seen, bad = [], {}, [], None
                for micro in range(cfg.train.grad_accum):
                    batch_idx = self.sampler.next_batch()  # the global batch: the same on every process
                    batch = self.collator(self._examples(distributed.shard_batch(batch_idx, rank, world)))
                    batch = {k: v.to(device) for k, v in batch.items()}
                    names = sorted({self.task_names[t] for t, _ in batch_idx})
                    tasks_seen.extend(names)
                    extra = {}
                    if world > 1:
                        # Token mean over the global batch: each process divides its sum by the global label
                        # count over the number of processes, and the gradient average restores the mean.
                        labelled = (batch["labels"][:, 1:] != -100).sum().float()
                        extra["num_items_in_batch"] = accelerator.reduce(labelled, "sum") / world
                    # gradients are all-reduced once per step, after the last micro-batch (a no-op in one process)
                    sync = accelerator.no_sync(prepared) if micro < cfg.train.grad_accum - 1 \
                        else contextlib.nullcontext()
                    with sync:
                        if deepspeed_engine is not None:
                            deepspeed_engine.set_gradient_accumulation_boundary(micro == cfg.train.grad_accum - 1)
                        out = prepared(**batch, **extra)
                        loss = out.loss
                        # one collective for the logged loss and the token count; every process then makes the
                        # same decision about a non-finite loss
                        shared = distributed.all_reduce_mean_detached(torch.stack(
                            [loss.detach().float(), batch["attention_mask"].sum().float()]))
                        if not torch.isfinite(shared[0]):
                            bad = (micro, names, float(shared[0]))
                            break
                        if deepspeed_engine is not None:
                            deepspeed_engine.backward(loss)  # DeepSpeed divides by the accumulation steps
                        else:
                            accelerator.backward(loss / cfg.train.grad_accum)
                    losses.append(float(shared[0]))
                    for k, v in model.last_aux_losses.items():
                        aux_sums[k] = aux_sums.get(k, 0.0) + float(v) / cfg.train.grad_accum
                    tokens += int(round(float(shared[1]) * world))
                if bad is None and cfg.train.max_grad_norm and deepspeed_engine is None:
                    norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                    if norm is not None and not torch.isfinite(torch.as_tensor(norm)):  # the update: NaN
                        bad = (None, sorted(set(tasks_seen)), float(norm))
                if bad is not None:
                    optimizer.zero_grad(set_to_none=True)
                    what = "loss" if bad[0] is not None else "gradient norm"
                    last = checkpoint_dirs(self.output_dir)
                    last_text = last[-1] if last else "none (no checkpoint yet)"
                    if cfg.train.nan_policy == "skip":
                        result.skipped_batches += 1
                        consecutive_skips += 1
                        log(log_path, {"step": step + 1, "skipped": True,
                                       "reason": f"non-finite {what}", "tasks": bad[1]})
                        if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                            raise TrainingError(
                                f"{consecutive_skips} batches in a row had a non-finite loss or gradient "
                                f"(the last: non-finite {what} at step {step + 1}): the weights or the "
                                f"learning rate are broken; the last good checkpoint is {last_text}. "
                                f"Lower train.lr")
                        continue
                    where = f" (micro-batch {bad[0]})" if bad[0] is not None else ""
                    raise TrainingError(
                        f"non-finite {what} ({bad[2]}) at step {step + 1}{where}; tasks in the batch: "
                        f"{bad[1]}. Nothing was saved from this step; the last good checkpoint is "
                        f"{last_text}. Set train.nan_policy=skip to drop such batches, or lower train.lr")
                consecutive_skips = 0
                with _sigint_deferred():  # a Ctrl-C never lands between the update and the step count
                    if deepspeed_engine is not None:
                        # DeepSpeed clips inside its step, so its gradient norm is known only afterwards
                        deepspeed_engine.step()
                        norm = deepspeed_engine.get_global_grad_norm()
                        if norm is not None and not math.isfinite(float(norm)):
                            raise TrainingError(
                                f"non-finite gradient norm ({float(norm)}) at step {step + 1} under DeepSpeed, "
                                f"which has already applied the update; tasks in the batch: "
                                f"{sorted(set(tasks_seen))}. Nothing was saved from this step; resume from the "
                                f"last good checkpoint with a lower train.lr")
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    step_state = (self.sampler.state_dict(), _rng_state())  # what a Ctrl-C now saves
                last_loss = float(np.mean(losses))
                elapsed = max(time.perf_counter() - t0, 1e-9)
                record = {"step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                          **{f"aux/{k}": v for k, v in aux_sums.items()}, "tokens_per_s": tokens / elapsed,
                          "tasks": sorted(set(tasks_seen))}
                result.history.append(record)
                bar.update(1)
                bar.set_postfix({"loss": f"{last_loss:.4f}", **{k: f"{v:.3g}" for k, v in aux_sums.items()},
                                 "tok/s": f"{tokens / elapsed:.0f}"})
                if cfg.train.log_every and (step % cfg.train.log_every == 0 or step == cfg.train.steps):
                    log(log_path, record)
                if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.steps:
                    save((self.sampler.state_dict(), _rng_state()))
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                    prepared.eval()
                    res = evaluate_all()
                    if res is not None:
                        log(log_path, {"step": step, "eval_macro": res.macro, "eval_micro": res.micro})
                    accelerator.wait_for_everyone()
                if os.environ.get(STEP_DELAY_ENV):
                    time.sleep(float(os.environ[STEP_DELAY_ENV]))
        except KeyboardInterrupt:
            bar.close()
            if engine.sharded:
                # gathering sharded state is a collective that processes the signal missed would never join
                last = checkpoint_dirs(self.output_dir)
                raise TrainingInterrupted(f"interrupted at step {step}; under {engine.describe()} no checkpoint "
                                          f"is written on interrupt; the last checkpoint is "
                                          f"{last[-1] if last else 'none'}; continue with --resume") from None
            # no barrier here: a process the signal missed may be blocked in a collective
            path = save(step_state, barrier=False)
            raise TrainingInterrupted(f"interrupted at step {step}; checkpoint saved to {path}; continue with "
                                      f"--resume") from None
        bar.close()
        save((self.sampler.state_dict(), _rng_state()))
        result.steps, result.final_loss, result.is_main_process = step, last_loss, main
        prepared.eval()
        final_eval = evaluate_all()
        if not main:
            return result
        try:
            model.save_pretrained(self.output_dir / "adapter", metadata={"run": cfg.name, "steps": step},
                                  state_dict=last_saved["adapter"])
        except (OSError, ValueError) as exc:
            raise TrainingError(f"could not write the adapter {self.output_dir / 'adapter'}: {exc}. The "
                                f"last checkpoint ({checkpoint_dirs(self.output_dir)[-1]}) is intact; free "
                                f"space or fix permissions and resume with --resume to write it again") from exc
        result.eval = final_eval
        if result.eval is not None:
            result.eval.save(self.output_dir / "eval")
        summary = {"steps": step, "final_loss": last_loss, "skipped_batches": result.skipped_batches,
                   "processes": world, "engine": engine.describe(),
                   "trainable_parameters": model.num_trainable_parameters(),
                   "eval": None if result.eval is None else {"macro": result.eval.macro, "micro": result.eval.micro},
                   "eval_before": None if result.eval_before is None else {"macro": result.eval_before.macro,
                                                                           "micro": result.eval_before.micro}}
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return result

    def _save(self, step: int, model: MTModel, adapter_state, optimizer_state, scheduler, state) -> Path:
        sampler_state, rng = state
        return save_checkpoint(self.output_dir, step, model, optimizer_state, scheduler, sampler_state, rng,
                               {"tasks": self.task_names}, keep=self.cfg.train.keep_checkpoints,
                               adapter_state=adapter_state)

    def _load_checkpoint(self, path: Path, model: MTModel, scheduler) -> tuple[int, dict[str, Any]]:
        """Restore adapter, scheduler, data position and RNG; returns the step and the optimizer state, which
        is loaded after ``accelerator.prepare`` (sharded engines rebuild the optimizer's parameters there)."""
        state = json.loads((path / "trainer_state.json").read_text())
        if state.get("tasks") != self.task_names:
            raise TrainingError(f"checkpoint {path} was made for tasks {state.get('tasks')}, this run has "
                                f"{self.task_names}")
        adapter = load_file(str(path / "adapter" / "adapter_model.safetensors"))
        model.load_adapter_state_dict(adapter, source=str(path / "adapter"))
        optimizer_state = _optimizer_from_files(load_file(str(path / "optimizer.safetensors")), state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        _set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
        return int(state["step"]), optimizer_state

    @staticmethod
    def _log(path: Path, record: dict[str, Any]) -> None:
        try:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, default=_json_default) + "\n")
        except OSError as exc:
            last = checkpoint_dirs(path.parent)
            raise TrainingError(f"could not write the metrics log {path}: {exc}. The last good checkpoint "
                                f"is {last[-1] if last else 'none (no checkpoint yet)'}; free space or fix "
                                f"permissions and resume with --resume") from exc


def train(cfg: RunConfig, *, resume: bool = False, progress: bool = True, **kwargs: Any) -> TrainResult:
    """Train a run config end to end (load, calibrate, train, checkpoint, save, evaluate)."""
    return Trainer(cfg, progress=progress, **kwargs).train(resume=resume)
