"""Whole training state under every accelerate engine: data parallelism, FSDP2 and DeepSpeed ZeRO 1-3.

mtpeft checkpoints hold whole tensors, written once by the main process, whatever engine trained them, so a run
resumes under any engine and with any number of processes. Under data parallelism every process already holds
whole tensors. FSDP2 shards parameters and optimizer state into DTensors; DeepSpeed ZeRO partitions the optimizer
state (stages 1-2) and the parameters as well (stage 3), and keeps fp32 master weights of its own.

The gather functions are collectives under the sharded engines: every process calls them, in the same order.
The optimizer state comes out in ``torch.optim.Optimizer.state_dict()`` form (state keyed by the parameter's
position in the parameter groups), which is what a single-process run saves.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.distributed import whole_tensor
from ..errors import EngineError, TrainingError
from .tracking import accelerator_kwargs

# Optimizer state tensors that DeepSpeed keeps per parameter for AdamW (torch's and DeepSpeed's own).
_ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class Engine:
    """The engine accelerate runs: ``NO``, ``MULTI_CPU``, ``MULTI_GPU``, ``FSDP`` or ``DEEPSPEED``."""

    name: str
    zero_stage: int | None = None

    @property
    def sharded(self) -> bool:
        """Whether some training state lives in pieces across processes (FSDP, DeepSpeed ZeRO)."""
        return self.name in ("FSDP", "DEEPSPEED")

    @property
    def deepspeed(self) -> bool:
        return self.name == "DEEPSPEED"

    def describe(self) -> str:
        """A short name for logs and summaries, e.g. ``DEEPSPEED (ZeRO-3)``."""
        return f"{self.name} (ZeRO-{self.zero_stage})" if self.deepspeed else self.name


def engine_of(accelerator: Any) -> Engine:
    """The engine of an ``accelerate.Accelerator``; refuses FSDP1, whose flat parameters mtpeft cannot address."""
    name = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if name == "FSDP" and not accelerator.is_fsdp2:
        raise EngineError("FSDP1 is not supported: mtpeft reads adapter parameters by name, which FSDP1 flattens. "
                          "Set fsdp_version: 2 in the accelerate config (examples/accelerate/fsdp.yaml)")
    fsdp_plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    if name == "FSDP" and getattr(fsdp_plugin, "cpu_ram_efficient_loading", False):
        # accelerate then rebuilds the model from state_dict(), which for an MTModel holds only the adapter
        raise EngineError("fsdp_cpu_ram_efficient_loading: true is not supported: the frozen base would be lost. "
                          "Set it to false in the accelerate config (examples/accelerate/fsdp.yaml)")
    if name == "DEEPSPEED":
        return Engine(name, int(accelerator.state.deepspeed_plugin.zero_stage))
    if name not in ("NO", "MULTI_CPU", "MULTI_GPU", "FSDP"):
        raise EngineError(f"accelerate's {name} engine is not supported by mtpeft train: use data parallelism, "
                          f"FSDP2 or DeepSpeed ZeRO (examples/accelerate/)")
    return Engine(name)


def accelerator_for(cfg: Any) -> tuple[Any, Engine]:
    """The ``accelerate.Accelerator`` of a run config (:class:`~mtpeft.training.run_config.RunConfig`) and its
    engine, refusing what that engine and number of processes cannot do before anything is written."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cpu = cfg.train.device == "cpu" or (cfg.train.device is None and not torch.cuda.is_available())
    # Task-indexed weights of tasks missing from one process's shard get no gradient there.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(mixed_precision="bf16" if cfg.train.precision == "bf16" else "no", cpu=cpu,
                              kwargs_handlers=[ddp], **accelerator_kwargs(cfg))  # train.report_to
    try:
        engine = engine_of(accelerator)
    except EngineError as exc:
        raise TrainingError(str(exc)) from None
    check_run_supported(engine, accelerator.num_processes, cfg)
    return accelerator, engine


def check_run_supported(engine: Engine, world: int, cfg: Any) -> None:
    """Refuse what a run config asks that this engine and this number of processes cannot do."""
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


def configure_deepspeed(accelerator: Any, *, global_batch: int, grad_accum: int, max_grad_norm: float) -> None:
    """Fill the DeepSpeed config from the run config before ``accelerator.prepare``.

    The run config owns batch size, accumulation and clipping; values in the accelerate/DeepSpeed config file
    are overwritten so that one run config trains the same way under every engine.
    """
    world = accelerator.num_processes
    local = -(-global_batch // world)  # the largest shard; DeepSpeed only uses it for bookkeeping
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = local
    config["gradient_accumulation_steps"] = grad_accum
    config["train_batch_size"] = local * grad_accum * world
    config["gradient_clipping"] = float(max_grad_norm or 0.0)  # 0 disables clipping in DeepSpeed
    accelerator.state.deepspeed_plugin.gradient_accumulation_steps = grad_accum


@contextmanager
def _zero3_gathered(params: Sequence[nn.Parameter], engine: Engine) -> Iterator[None]:
    if engine.zero_stage == 3 and params:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
            yield
    else:
        yield


def gather_adapter_state(model: Any, engine: Engine) -> dict[str, torch.Tensor]:
    """The adapter's whole tensors on the CPU, keyed like ``MTModel.adapter_state_dict`` (a collective).

    Under DeepSpeed the trainable tensors are its fp32 master weights, which is what training continues from.
    """
    params = dict(model.base_model.named_parameters())
    adapter_params = [params[k] for k in model.adapter_state_dict() if k in params]
    out: dict[str, torch.Tensor] = {}
    with _zero3_gathered(adapter_params, engine):
        for key, value in model.adapter_state_dict().items():
            param = params.get(key)
            if engine.deepspeed and param is not None and param.requires_grad:
                from deepspeed.utils import safe_get_full_fp32_param

                master = safe_get_full_fp32_param(param)
                if master is not None:
                    value = master.to(param.dtype)
            out[key] = whole_tensor(value).detach().cpu().clone()
    return out


def _optimizer_chain(optimizer: Any) -> list[Any]:
    """accelerate's wrapper, DeepSpeed's ZeRO optimizer, ..., the torch optimizer that holds ``state`` (last)."""
    chain = [optimizer]
    while hasattr(chain[-1], "optimizer") and chain[-1].optimizer is not chain[-1]:
        chain.append(chain[-1].optimizer)
    return chain


def _deepspeed_inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's and DeepSpeed's wrappers (the one that holds ``state``)."""
    return _optimizer_chain(optimizer)[-1]


def _create_deepspeed_optimizer_state(optimizer: Any) -> None:
    """Give ZeRO's flat fp32 partitions their AdamW state before the first step, so that it can be set.

    torch's AdamW creates its state lazily in the first ``step``, and ZeRO-1/2 link each parameter's share of
    it only then; a resumed run sets the state before any step.
    """
    chain = _optimizer_chain(optimizer)
    inner = chain[-1]
    zero = next((o for o in chain if hasattr(o, "_lazy_init_hp_params_optimizer_state")
                 or hasattr(o, "fp32_partitioned_groups_flat")), inner)
    # ZeRO-3 keeps its flat partitions out of the torch optimizer's groups between steps
    flats = getattr(zero, "fp32_partitioned_groups_flat", None) or [
        flat for group in inner.param_groups for flat in group["params"]]
    for flat in flats:
        entry = inner.state[flat]  # a defaultdict in torch optimizers
        entry.setdefault("step", torch.tensor(0.0))
        for key in _ADAM_STATE_KEYS:
            entry.setdefault(key, torch.zeros_like(flat))
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2; ZeRO-3 reads the state directly
        zero._lazy_init_hp_params_optimizer_state()


def _deepspeed_step(optimizer: Any) -> torch.Tensor | None:
    for entry in _deepspeed_inner_optimizer(optimizer).state.values():
        if "step" in entry:
            return torch.as_tensor(entry["step"], dtype=torch.float32).detach().cpu().clone()
    return None


def gather_optimizer_state(optimizer: Any, params: Sequence[nn.Parameter], group_sizes: Sequence[int],
                           engine: Engine) -> dict[str, Any]:
    """Whole optimizer state in ``Optimizer.state_dict()`` form (a collective under sharded engines).

    ``params`` are the trainable parameters in the order the optimizer was built with and ``group_sizes`` the
    number of parameters in each group: DeepSpeed replaces the groups' parameters by flat partitions.
    """
    if not engine.deepspeed:
        state = optimizer.state_dict()
        return {"state": {i: {k: whole_tensor(v).detach().cpu().clone() if isinstance(v, torch.Tensor) else v
                              for k, v in entry.items()} for i, entry in state["state"].items()},
                "param_groups": state["param_groups"]}
    from deepspeed.utils import safe_get_full_optimizer_state

    step = _deepspeed_step(optimizer)
    out: dict[int, dict[str, Any]] = {}
    for index, param in enumerate(params):
        entry = {}
        for key in _ADAM_STATE_KEYS:
            value = safe_get_full_optimizer_state(param, key)
            if value is not None:
                entry[key] = value.detach().float().cpu().clone()
        if entry and step is not None:
            entry["step"] = step.clone()
        if entry:
            out[index] = entry
    groups, start = [], 0
    for group, size in zip(optimizer.param_groups, group_sizes):
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": list(range(start, start + size))})
        start += size
    return {"state": out, "param_groups": groups}


def load_optimizer_state(optimizer: Any, params: Sequence[nn.Parameter], state: dict[str, Any],
                         engine: Engine) -> None:
    """Restore whole optimizer state saved by :func:`gather_optimizer_state` into a prepared optimizer.

    Call after ``accelerator.prepare``: FSDP2 swaps the parameters for DTensors there and DeepSpeed builds its
    partitions, and state loaded before would be dropped.
    """
    if engine.deepspeed:
        from deepspeed.utils import safe_set_full_optimizer_state

        _create_deepspeed_optimizer_state(optimizer)
        step = None
        for index, param in enumerate(params):
            for key, value in state["state"].get(index, {}).items():
                if key == "step":
                    step = value
                elif key in _ADAM_STATE_KEYS:
                    safe_set_full_optimizer_state(param, value.to(param.device), key)
        if step is not None:
            for entry in _deepspeed_inner_optimizer(optimizer).state.values():
                if "step" in entry:
                    entry["step"] = step.to(entry["step"]) if isinstance(entry["step"], torch.Tensor) \
                        else type(entry["step"])(step.item())
        for group, saved in zip(optimizer.param_groups, state["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        return
    current = [p for group in optimizer.param_groups for p in group["params"]]
    restored: dict[int, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        param = current[int(index)]
        restored[int(index)] = {k: _shard_like(v, param) for k, v in entry.items()}
    optimizer.load_state_dict({"state": restored, "param_groups": state["param_groups"]})


def _shard_like(value: Any, param: torch.Tensor) -> Any:
    """A whole state tensor laid out like its FSDP2 parameter (a DTensor); other values unchanged."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(param.shape):
        return distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh, param.placements)
    return value
