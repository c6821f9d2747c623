"""The training recipe on accelerate: mixed-task batches, checkpoints written atomically, exact resume.

:class:`MultiTaskTrainer` runs a run config in named phases, as a torchtune recipe does: ``setup``, ``train_loop``
(one ``train_step`` per optimizer step), ``save_checkpoint`` and ``finish``; :func:`train` runs them all. Beside it:
checkpoint files (:mod:`.checkpoint`), engines (:mod:`.engines`), the non-finite and Ctrl-C guards (:mod:`.guards`),
experiment trackers (:mod:`.tracking`). The trainer never knows a method by name: it sees ``out.loss``,
``out.aux_losses``, ``model.param_groups``, ``model.needs_calibration`` and ``model.set_global_step``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import set_seed

from ..core import distributed
from ..data.collator import MultiTaskCollator, use_chat_template
from ..data.lengths import screen_lengths
from ..data.mixing import MixtureSampler, batch_examples, leading_batches
from ..data.resolve import resolve_task_specs
from ..data.tasks import Example, TaskData, TaskSpec, load_tasks
from ..errors import TrainingError, TrainingInterrupted
from ..model import MTModel, get_mt_model
from . import engines, packing, plots, task_losses, tracking
from .checkpoint import (
    RandomState,
    SavedCheckpoint,
    checkpoint_path,
    json_default,
    last_checkpoint_text,
    load_checkpoint,
    random_state,
    restore_random_state,
    save_checkpoint,
)
from .guards import MAX_CONSECUTIVE_SKIPS, NonFiniteGuard, sigint_deferred
from .optim import build_optimizer, build_scheduler
from .run_config import RunConfig, method_config_for
from .run_folder import open_run_folder, release_run_lock

__all__ = ["MAX_CONSECUTIVE_SKIPS", "STEP_DELAY_ENV", "LoopState", "MultiTaskTrainer", "TrainResult", "TrainingError",
           "TrainingInterrupted", "train"]

# Fault-injection aid for the kill/resume tests: seconds to sleep after each optimizer step.
STEP_DELAY_ENV = "MTPEFT_STEP_DELAY_S"


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


@dataclass
class LoopState:
    """Where the loop stands: the optimizer step, what a Ctrl-C saves, and the running counts of the logs."""

    step: int
    resume_point: tuple[dict[str, Any], RandomState]  # sampler and RNG state at the last step boundary
    last_loss: float | None = None
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)


class MultiTaskTrainer:
    """Train one run config in named phases (see the module docstring); :meth:`train` runs them all.

    ``model``/``tokenizer``/``tasks`` (``(spec, data)`` pairs) may be given to skip loading them. After
    :meth:`setup`: ``accelerator``, ``engine``, ``device``, ``optimizer``, ``scheduler``, ``prepared`` (the model
    as accelerate wraps it), ``result`` and ``loop`` (a :class:`LoopState`).
    """

    def __init__(self, cfg: RunConfig, *, model: MTModel | None = None, tokenizer: Any = None,
                 tasks: list[tuple[TaskSpec, TaskData]] | None = None, progress: bool | str = True,
                 base_model: Any = None) -> None:
        from ..base_models import load_run_base_model, load_tokenizer

        self.cfg = cfg
        self.progress = progress
        self.output_dir = Path(cfg.output_dir)
        self.tokenizer = tokenizer or load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
        use_chat_template(self.tokenizer, cfg.data.chat_template)
        if tasks is None:
            tasks = [(data.spec, data) for data in load_tasks(resolve_task_specs(cfg), cfg.data.root)]
            if empty := [spec.name for spec, data in tasks if not data.train]:
                raise ValueError(f"task {empty[0]!r} has no training examples")
        self.tasks, self.lengths = screen_lengths(tasks, self.tokenizer, cfg.data.max_length, cfg.data.truncation)
        self.task_names = [spec.name for spec, _ in self.tasks]
        method_cfg = method_config_for(cfg, self.task_names)  # fail before the model is loaded
        set_seed(cfg.train.seed)  # python, numpy and torch
        if model is None:
            base = base_model if base_model is not None else load_run_base_model(cfg.model)
            model = get_mt_model(base, method_cfg)
        self.model = model
        self.model.loss_chunk_size = cfg.train.loss_chunk_size
        if cfg.model.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        if cfg.train.compile:
            self.model.compile()
        self.collator = MultiTaskCollator(self.tokenizer, self.task_names, max_length=cfg.data.max_length,
                                          truncation=cfg.data.truncation, packing=cfg.data.packing)
        self.sampler = MixtureSampler([len(d.train) for _, d in self.tasks], cfg.train.batch_size,
                                      strategy=cfg.data.mixing, temperature=cfg.data.temperature,
                                      task_balanced=cfg.data.task_balanced, seed=cfg.train.seed)
        self._train_examples = [data.train for _, data in self.tasks]
        self.log_path = self.output_dir / "metrics.jsonl"
        self._last_adapter_state: dict[str, torch.Tensor] | None = None

    # --- evaluation -----------------------------------------------------------------------------------
    def eval_sets(self) -> list[tuple[TaskSpec, list[Example]]]:
        """(spec, eval examples) of every task that has eval examples."""
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

    def _evaluate_all(self) -> Any:
        # Every process takes part, the main one reports. Under data parallelism each evaluates its share of the
        # examples; a sharded model (FSDP, ZeRO) runs only when every process runs it: all evaluate every example.
        return self.evaluate(self.device, progress=self.progress and self.main, shard=not self.engine.sharded)

    # --- phases ---------------------------------------------------------------------------------------
    def train(self, resume: bool = False, overwrite: bool = False) -> TrainResult:
        """Run every phase; ``resume``/``overwrite`` continue or restart a run folder (see :mod:`.run_folder`)."""
        try:
            self.setup(resume, overwrite)
            self.train_loop()
            return self.finish()
        finally:
            release_run_lock(self.output_dir)

    def setup(self, resume: bool = False, overwrite: bool = False) -> None:
        """Accelerate and its engine, the output folder and run_config.yaml, evaluation before training,
        calibration, optimizer and scheduler; with ``resume`` the state of the latest complete checkpoint."""
        cfg = self.cfg
        accelerator, self.engine = engines.accelerator_for(cfg)
        self.accelerator, self.device, self.main = accelerator, accelerator.device, accelerator.is_main_process
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.run_folder = open_run_folder(cfg, resume=resume, overwrite=overwrite, main=self.main)  # checks first
        self.tracker = tracking.RunTracker(accelerator, cfg)  # train.report_to (off by default)
        model = packing.checked_model(self.model.to(self.device), cfg.data)  # data.packing: attention checked
        checkpoints = self.run_folder.checkpoints
        accelerator.wait_for_everyone()  # every process has checked the folder before anyone writes to it
        self.result = TrainResult(self.output_dir, 0, None)
        if cfg.eval.before_training and not checkpoints:
            model.eval()  # not sharded yet under any engine: each process evaluates its share of the examples
            self.result.eval_before = self.evaluate(self.device, progress=self.progress and self.main, shard=True)
            if self.main and self.result.eval_before is not None:  # kept in the run folder, not only printed
                self.result.eval_before.save(self.output_dir / "eval", name="before")
        if model.needs_calibration and not checkpoints:
            chunks = leading_batches(self._train_examples, cfg.train.batch_size, cfg.train.calibration_batches)
            model.calibrate([{k: v.to(self.device) for k, v in self.collator.padded(c).items()} for c in chunks])

        optimizer, self._optimized, self._group_sizes = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay)
        self.scheduler = build_scheduler(optimizer, cfg.train)
        saved = self._restore(checkpoints[-1]) if checkpoints else None
        start_step = saved.step if saved is not None else 0
        if self.world > 1:  # the same seed everywhere would give every process the same dropout masks
            torch.manual_seed(cfg.train.seed + 1_000_003 * self.rank + start_step)
        if self.engine.deepspeed:
            engines.configure_deepspeed(accelerator, global_batch=cfg.train.batch_size,
                                        grad_accum=cfg.train.grad_accum, max_grad_norm=cfg.train.max_grad_norm)
        self.prepared, self.optimizer = accelerator.prepare(model, optimizer)
        if saved is not None:
            engines.load_optimizer_state(self.optimizer, self._optimized, saved.optimizer, self.engine)
        self.deepspeed_engine = accelerator.deepspeed_engine_wrapped.engine if self.engine.deepspeed else None
        if self.main:
            self.run_folder.start_log(self.log_path, start_step if checkpoints else None)
        self.guard = NonFiniteGuard(cfg.train.nan_policy, self.output_dir, self._log_main)
        self.loop = LoopState(start_step, (self.sampler.state_dict(), random_state()))
        model.context.total_steps = cfg.train.steps  # for regularizers scheduled relative to the run

    def _restore(self, path: Path) -> SavedCheckpoint:
        """Adapter, scheduler, data position and RNG of checkpoint ``path``; the optimizer state it returns is
        loaded after ``accelerator.prepare`` (sharded engines rebuild the optimizer's parameters there)."""
        saved = load_checkpoint(path, self.task_names)
        self.model.context.counters = dict(saved.counters)  # counted over the whole run, not since the resume
        self.model.load_adapter_state_dict(saved.adapter, source=str(path / "adapter"))
        self.scheduler.load_state_dict(saved.scheduler)
        self.sampler.load_state_dict(saved.sampler)
        restore_random_state(*saved.rng)
        return saved

    def train_loop(self) -> None:
        """Optimizer steps up to ``train.steps``, with logs, checkpoints and evaluations on their schedule. A
        Ctrl-C saves a checkpoint of the last finished step (not under sharded engines) and raises
        TrainingInterrupted."""
        from tqdm.auto import tqdm

        cfg, loop = self.cfg, self.loop
        bar = tqdm(total=cfg.train.steps, initial=loop.step, disable=not (self.progress is True and self.main),
                   desc="train", dynamic_ncols=True)
        try:
            while loop.step < cfg.train.steps:
                record = self.train_step()
                if record is None:  # a skipped batch (nan_policy=skip)
                    continue
                self.result.history.append(record)
                bar.update(1)
                bar.set_postfix({"loss": f"{record['loss']:.4f}",
                                 **{k[4:]: f"{v:.3g}" for k, v in record.items() if k.startswith("aux/")},
                                 "tok/s": f"{record['tokens_per_s']:.0f}"})
                self._on_schedule(record)
        except KeyboardInterrupt:
            bar.close()
            if self.engine.sharded:
                # gathering sharded state is a collective that processes the signal missed would never join
                raise TrainingInterrupted(f"interrupted at step {loop.step}; under {self.engine.describe()} no "
                                          f"checkpoint is written on interrupt; the last checkpoint is "
                                          f"{last_checkpoint_text(self.output_dir, 'none')}; continue with "
                                          f"--resume") from None
            # no barrier here: a process the signal missed may be blocked in a collective
            path = self.save_checkpoint(loop.resume_point, barrier=False)
            raise TrainingInterrupted(f"interrupted at step {loop.step}; checkpoint saved to {path}; continue with "
                                      f"--resume") from None
        bar.close()

    def _on_schedule(self, record: dict[str, Any]) -> None:
        """After optimizer step ``record['step']``: the metrics line, a checkpoint and an evaluation when due."""
        train, step = self.cfg.train, self.loop.step
        if train.log_every and (step % train.log_every == 0 or step == train.steps):
            self._log_main(record)
        if train.save_every and step % train.save_every == 0 and step < train.steps:
            self.save_checkpoint()
        if train.eval_every and step % train.eval_every == 0 and step < train.steps:
            self.prepared.eval()
            res = self._evaluate_all()
            if res is not None:
                self._log_main(plots.eval_record(step, res))
            self.accelerator.wait_for_everyone()
        if os.environ.get(STEP_DELAY_ENV):
            time.sleep(float(os.environ[STEP_DELAY_ENV]))

    def train_step(self) -> dict[str, Any] | None:
        """One optimizer step over ``train.grad_accum`` micro-batches; its metrics record, or None when the batch
        was skipped for a non-finite loss or gradient (``nan_policy=skip``; ``error`` raises)."""
        cfg, loop, model, accelerator = self.cfg, self.loop, self.model, self.accelerator
        accum, ds_engine = cfg.train.grad_accum, self.deepspeed_engine
        loop.resume_point = (self.sampler.state_dict(), random_state())
        self.prepared.train()
        model.set_global_step(loop.step)
        losses, aux_sums, tasks_seen, bad, per_task = [], {}, [], None, task_losses.for_step(self)
        for micro in range(accum):
            batch_idx = self.sampler.next_batch()  # the global batch: the same on every process
            mine = batch_examples(distributed.shard_batch(batch_idx, self.rank, self.world), self._train_examples)
            batch = {k: v.to(self.device) for k, v in self.collator(mine).items()}
            names = sorted({self.task_names[t] for t, _ in batch_idx})
            tasks_seen.extend(names)
            extra = {}
            if self.world > 1:
                # Token mean over the global batch: each process divides its sum by the global label count over
                # the number of processes, and the gradient average restores the mean.
                labelled = (batch["labels"][:, 1:] != -100).sum().float()
                extra["num_items_in_batch"] = accelerator.reduce(labelled, "sum") / self.world
            # gradients are all-reduced once per step, after the last micro-batch (a no-op in one process)
            sync = accelerator.no_sync(self.prepared) if micro < accum - 1 else contextlib.nullcontext()
            model.context.micro_step = micro  # terms meant once per optimizer step go on micro-batch 0 only
            with sync:
                if ds_engine is not None:
                    ds_engine.set_gradient_accumulation_boundary(micro == accum - 1)
                loss = per_task.add(self.prepared(**batch, **extra), batch).loss  # per-task loss on logged steps
                # one collective for the logged loss and the token count; every process then makes the same
                # decision about a non-finite loss
                shared = distributed.all_reduce_mean_detached(torch.stack(
                    [loss.detach().float(), packing.real_token_count(batch)]))
                if not torch.isfinite(shared[0]):
                    bad = (micro, names, float(shared[0]))
                    break
                if ds_engine is not None:
                    ds_engine.backward(loss)  # DeepSpeed divides by the accumulation steps
                else:
                    accelerator.backward(loss / accum)
            losses.append(float(shared[0]))
            for k, v in model.last_aux_losses.items():
                aux_sums[k] = aux_sums.get(k, 0.0) + float(v) / accum
            loop.tokens += int(round(float(shared[1]) * self.world))
        if bad is None and cfg.train.max_grad_norm and ds_engine is None:
            norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
            if norm is not None and not torch.isfinite(torch.as_tensor(norm)):  # the update: NaN
                bad = (None, sorted(set(tasks_seen)), float(norm))
        if bad is not None:
            self.optimizer.zero_grad(set_to_none=True)
            self.guard.failed(loop.step, *bad)
            self.result.skipped_batches = self.guard.skipped
            return None
        self.guard.passed()
        with sigint_deferred():  # a Ctrl-C never lands between the update and the step count
            if ds_engine is not None:
                ds_engine.step()
                self.guard.check_applied(ds_engine.get_global_grad_norm(), loop.step, sorted(set(tasks_seen)))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            loop.step += 1
            loop.resume_point = (self.sampler.state_dict(), random_state())  # what a Ctrl-C now saves
        loop.last_loss = float(np.mean(losses))
        elapsed = max(time.perf_counter() - loop.started, 1e-9)
        return {"step": loop.step, "loss": loop.last_loss, "lr": self.scheduler.get_last_lr()[0], **per_task.record(),
                **{f"aux/{k}": v for k, v in aux_sums.items()}, "tokens_per_s": loop.tokens / elapsed,
                "tasks": sorted(set(tasks_seen)), **({"counters": dict(model.context.counters)}
                                                     if model.context.counters else {})}

    def save_checkpoint(self, resume_point: tuple[dict[str, Any], RandomState] | None = None,
                        barrier: bool = True) -> Path:
        """Checkpoint the current step: every process takes part under sharded engines, the main process writes.
        ``resume_point``: the sampler and RNG state to save (default: as they are now); ``barrier``: no process
        runs ahead of a checkpoint it may resume from."""
        sampler_state, rng = resume_point or (self.sampler.state_dict(), random_state())
        step = self.loop.step
        path = checkpoint_path(self.output_dir, step)
        if self.main or self.engine.sharded:
            # a collective under FSDP and DeepSpeed: every process takes part, the main process writes
            adapter_state = engines.gather_adapter_state(self.model, self.engine)
            optimizer_state = engines.gather_optimizer_state(self.optimizer, self._optimized, self._group_sizes,
                                                             self.engine)
            if self.main:
                self._last_adapter_state = adapter_state
                path = save_checkpoint(self.output_dir, step, self.model, optimizer_state, self.scheduler,
                                       sampler_state, rng, {"tasks": self.task_names},
                                       keep=self.cfg.train.keep_checkpoints, adapter_state=adapter_state)
        if barrier:
            self.accelerator.wait_for_everyone()
        return path

    def finish(self) -> TrainResult:
        """The last checkpoint and the final evaluation; on the main process the adapter, ``eval/`` and
        ``summary.json``."""
        self.save_checkpoint()
        result, step = self.result, self.loop.step
        result.steps, result.final_loss, result.is_main_process = step, self.loop.last_loss, self.main
        self.prepared.eval()
        final_eval = self._evaluate_all()
        if not self.main:
            return result
        try:
            self.model.save_pretrained(self.output_dir / "adapter", metadata={"run": self.cfg.name, "steps": step},
                                       state_dict=self._last_adapter_state)
        except (OSError, ValueError) as exc:
            raise TrainingError(f"could not write the adapter {self.output_dir / 'adapter'}: {exc}. The last "
                                f"checkpoint ({last_checkpoint_text(self.output_dir)}) is intact; free space or fix "
                                f"permissions and resume with --resume to write it again") from exc
        result.eval = final_eval
        if result.eval is not None:
            result.eval.save(self.output_dir / "eval")
        self.tracker.finish(step, final_eval)
        scores = {name: None if res is None else {"macro": res.macro, "micro": res.micro}
                  for name, res in (("eval", result.eval), ("eval_before", result.eval_before))}
        summary = {"steps": step, "final_loss": self.loop.last_loss, "skipped_batches": result.skipped_batches,
                   "processes": self.world, "engine": self.engine.describe(),
                   "trainable_parameters": self.model.num_trainable_parameters(), **scores, "lengths": self.lengths,
                   "method_counters": dict(self.model.context.counters)}
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        plots.write_run_plots(self.output_dir, result.eval, result.eval_before, step, self.cfg.name)
        return result

    # --- metrics log ----------------------------------------------------------------------------------
    def _log_main(self, record: dict[str, Any]) -> None:
        if self.main:
            self._log(self.log_path, record)
            self.tracker.log(record)

    @staticmethod
    def _log(path: Path, record: dict[str, Any]) -> None:
        try:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, default=json_default) + "\n")
        except OSError as exc:
            raise TrainingError(f"could not write the metrics log {path}: {exc}. The last good checkpoint is "
                                f"{last_checkpoint_text(path.parent)}; free space or fix permissions and resume "
                                f"with --resume") from exc


def train(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          **kwargs: Any) -> TrainResult:
    """Train a run config end to end (load, calibrate, train, checkpoint, save, evaluate)."""
    return MultiTaskTrainer(cfg, progress=progress, **kwargs).train(resume=resume, overwrite=overwrite)
