"""The YAML run config: model, method, tasks, mixing, training, evaluation and output, validated up front.

Every section is a dataclass; unknown keys, wrong types and values outside their allowed set raise
:class:`RunConfigError` naming the full key (``train.lr``) and what is allowed. ``--set key.sub=value``
overrides are parsed as YAML scalars and applied before validation.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, RunConfigError
from ..registry import config_from_dict
from ..validation import as_float_where_expected, field_types, fits
from .tracking import TRACKERS


def _h(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class ModelSection:
    """Which base model to adapt."""

    name: str = _h("Hugging Face model name or local path; 'smollm2' = the offline SmolLM2-135M-Instruct.",
                   default="smollm2")
    dtype: str = _h("Weights dtype: float32, bfloat16, float16.", default="float32")
    trust_remote_code: bool = _h("Allow the model repository's own code to run (off unless asked for).",
                                 default=False)
    gradient_checkpointing: bool = _h("Activation checkpointing (less memory, more compute).", default=False)
    quantization: str | None = _h("Load the frozen base through bitsandbytes: '4bit' (NF4 + double quantization, "
                                  "i.e. QLoRA) or '8bit'; null = unquantized. Needs `pip install mtpeft[qlora]`.",
                                  default=None)

    def check(self, prefix: str) -> None:
        _one_of(f"{prefix}.dtype", self.dtype, ["float32", "bfloat16", "float16"])
        if self.quantization is not None:
            _one_of(f"{prefix}.quantization", self.quantization, ["4bit", "8bit"])


@dataclass
class DataSection:
    """How tasks are read, mixed and tokenized."""

    root: str | None = _h("Folder relative sources and presets resolve against (default: $MTPEFT_DATA_ROOT; "
                          "without either, the working directory).", default=None)
    max_length: int = _h("Longest sequence in tokens (prompt + target + EOS).", default=256)
    truncation: str = _h("Over-long training examples, found for every example before training starts (the "
                         "counts go to summary.json): 'left' drops prompt tokens from the start, 'right' from the "
                         "end of the prompt, 'skip' leaves the example out, 'error' (default) stops naming file and "
                         "line.", default="error")
    mixing: str = _h("Task sampling: 'proportional' (to dataset size), 'temperature', 'uniform'.",
                     default="proportional")
    temperature: float = _h("Mixing temperature T: p_t ~ n_t^(1/T).", default=2.0)
    task_balanced: int | None = _h("Each batch holds this many samples of every task (batch_size must be "
                                   "k * number of tasks).", default=None)
    max_train_per_task: int | None = _h("Cap on training examples per task.", default=None)
    max_eval_per_task: int | None = _h("Cap on evaluation examples per task.", default=None)
    chat_template: str = _h("Prompts through a chat template, alike in training, eval, predict and bench: 'auto' "
                            "(the tokenizer's own, for instruct models; none without one), 'none', or a Jinja "
                            "chat template.", default="none")
    packing: bool = _h("Training batches as packed rows: a micro-batch's examples (of any tasks) concatenated "
                       "into as few rows of max_length tokens as fit, each example attending only to itself, with "
                       "per-token task ids; the loss equals the padded batch's. Evaluation stays padded.",
                       default=False)

    def check(self, prefix: str) -> None:
        _one_of(f"{prefix}.truncation", self.truncation, ["left", "right", "skip", "error"])
        _one_of(f"{prefix}.mixing", self.mixing, ["proportional", "temperature", "uniform"])
        _positive(f"{prefix}.max_length", self.max_length)
        if self.max_length < 2:  # one token could hold no prompt and no target beside EOS
            raise RunConfigError(f"{prefix}.max_length must be >= 2, got {self.max_length}")
        _finite_above(f"{prefix}.temperature", self.temperature, 0.0)
        if self.task_balanced is not None:
            _positive(f"{prefix}.task_balanced", self.task_balanced)
        for key in ("max_train_per_task", "max_eval_per_task"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise RunConfigError(f"{prefix}.{key} must be >= 0 or null, got {getattr(self, key)}")


@dataclass
class TrainSection:
    """The optimization loop."""

    steps: int = _h("Optimizer steps.", default=100)
    batch_size: int = _h("Samples per micro-batch.", default=8)
    grad_accum: int = _h("Micro-batches per optimizer step.", default=1)
    lr: float = _h("Peak learning rate (AdamW).", default=2e-4)
    weight_decay: float = _h("AdamW weight decay.", default=0.0)
    warmup_ratio: float = _h("Fraction of steps of linear warmup.", default=0.03)
    schedule: str = _h("Learning-rate schedule after warmup: cosine, linear, constant.", default="cosine")
    max_grad_norm: float | None = _h("Gradient clipping norm, > 0 (null or 0: no clipping).", default=1.0)
    precision: str = _h("fp32 or bf16 (autocast through accelerate).", default="fp32")
    seed: int = _h("Seed for initialization, sampling and dropout.", default=0)
    log_every: int = _h("Steps between metric-log lines.", default=10)
    eval_every: int = _h("Steps between evaluations (0: only at the end).", default=0)
    save_every: int = _h("Steps between checkpoints (0: only at the end).", default=50)
    keep_checkpoints: int = _h("How many recent checkpoints to keep (at least 1: resume needs one).", default=2)
    nan_policy: str = _h("On a NaN/inf loss: 'error' stops (last good checkpoint kept), 'skip' drops the batch.",
                         default="error")
    calibration_batches: int = _h("Batches per task for methods with a calibration step (ThanoRA).", default=2)
    device: str | None = _h("Device: 'cpu', 'cuda', 'mps', or 'auto'/null (cuda if available, else cpu); under "
                            "accelerate launch each process takes its own GPU.", default=None)
    loss_chunk_size: int = _h("Causal LMs: compute the loss from labelled positions only, this many tokens of "
                              "logits at a time (0: the model's own full-logits loss).", default=1024)
    compile: bool = _h("torch.compile the decoder for training (adapters included). Off by default: on CPU a cold "
                       "compile costs minutes and pays back only after about 2,000 steps (benchmarks/README.md).",
                       default=False)
    report_to: str | list[str] = _h("Experiment trackers, through accelerate: tensorboard, wandb, mlflow, comet_ml, "
                                    "aim, clearml, dvclive, swanlab, trackio, or 'all' (every installed one); local "
                                    "ones write to <output_dir>/tracking. [] or 'none': off.", default_factory=list)

    def check(self, prefix: str) -> None:
        for key in ("steps", "batch_size", "grad_accum", "calibration_batches", "keep_checkpoints"):
            _positive(f"{prefix}.{key}", getattr(self, key))
        _finite_above(f"{prefix}.lr", self.lr, 0.0)
        _finite_above(f"{prefix}.weight_decay", self.weight_decay, 0.0, inclusive=True)
        if self.max_grad_norm is not None:  # a negative norm would scale the gradient the wrong way
            _finite_above(f"{prefix}.max_grad_norm", self.max_grad_norm, 0.0, inclusive=True)
        if not 0 <= self.warmup_ratio < 1:
            raise RunConfigError(f"{prefix}.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.seed < 2**32:  # numpy's seed range
            raise RunConfigError(f"{prefix}.seed must be in [0, 2**32), got {self.seed}")
        if self.device is not None:
            _one_of(f"{prefix}.device", self.device, list(DEVICES))
            self.device = None if self.device == "auto" else self.device  # what the engine reads as its default
        _one_of(f"{prefix}.schedule", self.schedule, ["cosine", "linear", "constant"])
        _one_of(f"{prefix}.precision", self.precision, ["fp32", "bf16"])
        _one_of(f"{prefix}.nan_policy", self.nan_policy, ["error", "skip"])
        self.report_to = [] if self.report_to == "none" else [self.report_to] if isinstance(self.report_to, str) \
            else list(self.report_to)
        for name in self.report_to:
            _one_of(f"{prefix}.report_to", name, list(TRACKERS))
        for key in ("log_every", "eval_every", "save_every", "loss_chunk_size"):
            if getattr(self, key) < 0:
                raise RunConfigError(f"{prefix}.{key} must be >= 0, got {getattr(self, key)}")


@dataclass
class EvalSection:
    """Per-task evaluation."""

    batch_size: int = _h("Prompts per generation/scoring batch.", default=16)
    max_new_tokens: int = _h("Generation budget per answer.", default=16)
    before_training: bool = _h("Also evaluate the untrained model (for the before/after table).", default=False)

    def check(self, prefix: str) -> None:
        _positive(f"{prefix}.batch_size", self.batch_size)
        _positive(f"{prefix}.max_new_tokens", self.max_new_tokens)


@dataclass
class RunConfig:
    """One training run. ``tasks`` entries are preset names ('bbh:snarks', 'bbh27', 'demo') or task specs."""

    tasks: list[Any] = _h("Task presets (strings) or task spec mappings.", default_factory=list)
    method: dict[str, Any] = _h("The adapter config: {method: NAME, r: ..., ...}; tasks are filled in.",
                                default_factory=lambda: {"method": "lora"})
    model: ModelSection = _h("Base model.", default_factory=ModelSection)
    data: DataSection = _h("Data reading, mixing, tokenization.", default_factory=DataSection)
    train: TrainSection = _h("Optimization.", default_factory=TrainSection)
    eval: EvalSection = _h("Evaluation.", default_factory=EvalSection)
    output_dir: str = _h("Run folder: checkpoints, adapter, metrics, predictions.", default="runs/run")
    name: str = _h("Run name (for reports).", default="run")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


#: Allowed ``train.device`` values besides null: the trainer runs on the CPU or on accelerate's own device.
DEVICES = ("cpu", "cuda", "mps", "auto")

_SECTIONS = {"model": ModelSection, "data": DataSection, "train": TrainSection, "eval": EvalSection}


def _one_of(key: str, value: Any, allowed: list[str]) -> None:
    if value not in allowed:
        raise RunConfigError(f"{key} must be one of {allowed}, got {value!r}")


def _finite_above(key: str, value: float, bound: float, *, inclusive: bool = False) -> None:
    """``value`` is a finite number > ``bound`` (>= with ``inclusive``); NaN and inf never are."""
    if not (math.isfinite(value) and (value >= bound if inclusive else value > bound)):
        raise RunConfigError(f"{key} must be a finite number {'>=' if inclusive else '>'} {bound:g}, got {value!r}")


def _positive(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise RunConfigError(f"{key} must be a positive integer, got {value!r}")


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """The value as the field stores it (ints and float text become floats where floats are expected); a
    mismatch is a RunConfigError naming the key."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    if value is None:
        if type(None) in options:
            return None
        raise RunConfigError(f"{key} must not be null")
    value = as_float_where_expected(value, annotation)
    if fits(value, annotation):
        return value
    names = [getattr(typing.get_origin(o) or o, "__name__", str(o)) for o in options]
    raise RunConfigError(f"{key} must be of type {' or '.join(names)}, got {type(value).__name__} {value!r}")


def _build_section(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RunConfigError(f"{prefix} must be a mapping, got {type(data).__name__}")
    hints = field_types(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known, key=str)
    if unknown:
        raise RunConfigError(f"unknown key {prefix}.{unknown[0]}; allowed keys in {prefix}: {sorted(known)}")
    values = {k: _check_type(f"{prefix}.{k}", v, hints[k]) for k, v in data.items()}
    section = cls(**values)
    section.check(prefix)
    return section


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Validate a run-config mapping (from YAML) into a RunConfig."""
    if not isinstance(data, dict):
        raise RunConfigError("a run config must be a YAML mapping")
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(data) - known, key=str)
    if unknown:
        raise RunConfigError(f"unknown key {unknown[0]!r}; allowed top-level keys: {sorted(known)}")
    values: dict[str, Any] = {}
    for key, cls in _SECTIONS.items():
        values[key] = _build_section(cls, data.get(key), key)
    tasks = data.get("tasks", [])
    if isinstance(tasks, str):
        tasks = [tasks]
    if not isinstance(tasks, list) or not tasks:
        raise RunConfigError("tasks must be a non-empty list of presets or task specs")
    for i, t in enumerate(tasks):
        if not isinstance(t, (str, dict)):
            raise RunConfigError(f"tasks[{i}] must be a preset name or a task mapping, got {type(t).__name__}")
    values["tasks"] = tasks
    method = data.get("method", {"method": "lora"})
    if isinstance(method, str):
        method = {"method": method}
    if not isinstance(method, dict) or "method" not in method:
        raise RunConfigError("method must be a mapping with a 'method' key, e.g. {method: thanora, r: 16}")
    try:  # validate the method's own keys now (tasks are filled in once the task list is resolved)
        config_from_dict({**method, "tasks": method.get("tasks") or ["_validate_"] * 1})
    except ConfigError as exc:
        raise RunConfigError(f"method: {exc}") from exc
    except TypeError as exc:
        raise RunConfigError(f"method: {exc}") from exc
    values["method"] = method
    for key in ("output_dir", "name"):
        if key in data:
            values[key] = _check_type(key, data[key], str)
    return RunConfig(**values)


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=1e-4' -> (['train', 'lr'], 1e-4); the value is parsed as a YAML scalar."""
    if "=" not in item:
        raise RunConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise RunConfigError(f"--set has an empty key: {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, TypeError, AttributeError) as exc:  # PyYAML's constructors: '!!float x'
        raise RunConfigError(f"--set {key}: cannot parse value {raw!r}: {exc}") from exc
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to the raw mapping (before validation)."""
    for item in overrides or []:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise RunConfigError(f"--set {'.'.join(path)}: {part} is not a mapping")
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return data


def load_run_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (None: all defaults), apply overrides and validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RunConfigError(f"run config {path} not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise RunConfigError(f"{path}:{where} invalid YAML: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise RunConfigError(f"{path}: not UTF-8 text ({exc})") from exc
        except (ValueError, TypeError, AttributeError) as exc:  # a bad tagged/typed value, e.g. 2024-13-45
            raise RunConfigError(f"{path}: invalid YAML value: {exc}") from exc
        if not isinstance(data, dict):
            raise RunConfigError(f"{path}: a run config must be a YAML mapping, got a {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    try:
        return run_config_from_dict(data)
    except RunConfigError as exc:
        raise RunConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None


def method_config_for(cfg: RunConfig, task_names: list[str]) -> Any:
    """The validated adapter config (:class:`~mtpeft.config.AdapterConfig`) of a run, with its resolved tasks."""
    try:
        return config_from_dict({**cfg.method, "tasks": task_names})
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"method: {exc}") from exc


def flat_keys(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested run-config mapping as ``{"train.lr": 0.0002, ...}`` (dotted keys, as ``--set`` names them)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flat_keys(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}
