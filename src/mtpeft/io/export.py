"""Export to the standard PEFT LoRA format (what PEFT, vLLM and lm-eval load)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from ..model import MergeError
from .atomic import atomic_write_dir

if TYPE_CHECKING:
    from ..model import MTModel

PEFT_PREFIX = "base_model.model."


def _task_type(model: torch.nn.Module) -> str | None:
    name = type(model).__name__
    for suffix, task_type in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                              ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
                              ("ForSeq2SeqLM", "SEQ_2_SEQ_LM")):
        if name.endswith(suffix):
            return task_type
    return None


def _target_module_names(all_linears: list[str], adapted: list[str]) -> list[str]:
    """Leaf names when they select exactly the adapted modules (what vLLM expects), else full names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    by_leaves = [n for n in all_linears if n.rsplit(".", 1)[-1] in leaves]
    return leaves if sorted(by_leaves) == sorted(adapted) else sorted(adapted)


def export_factors(model: MTModel, task: int | str | None, rank: int | None,
                   calibration: Iterable[dict[str, Any]] | None) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]],
                                                                         dict[str, Any]]:
    """Per-module LoRA factors (A, B with the scale folded into B) for ``task``, and a report.

    Exact for mergeable methods; input-routed methods go through the method's approximation hook.
    """
    method = model.method
    if model.merge_kind == "none":
        if rank is None:
            raise MergeError(method.merge_error or (
                f"method {method.name!r} is input-routed and has no exact plain-LoRA form; pass rank=k (and "
                f"calibration=batches) to export the task's expected update truncated to rank k"
            ))
        from .approx import approximate_factors

        return approximate_factors(model, task, rank, calibration)
    tid = model._merge_task(task)
    factors = {}
    for name, layer in model._linear_layers().items():
        a, b = layer.lora_factors(tid)
        factors[name] = (a.detach(), b.detach())
    report: dict[str, Any] = {"exact": True, "relative_error": 0.0}
    if rank is not None:
        factors, err = truncate_factors(factors, rank)
        report = {"exact": False, "rank": rank, "relative_error": err}
    return factors, report


def truncate_factors(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int
                     ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """Best rank-``rank`` approximation of each B @ A (SVD); returns the factors and the worst relative error."""
    out, worst = {}, 0.0
    for name, (a, b) in factors.items():
        delta = (b.double() @ a.double())
        a2, b2, err = svd_truncate(delta, rank)
        out[name] = (a2.to(a.dtype), b2.to(b.dtype))
        worst = max(worst, err)
    return out, worst


def svd_truncate(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Factors (A: k x d_in, B: d_out x k) of the best rank-k approximation and its relative Frobenius error."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    a = root[:, None] * vh[:k]
    b = u[:, :k] * root[None, :]
    norm = torch.linalg.norm(s)
    err = float(torch.linalg.norm(s[k:]) / norm) if norm > 0 else 0.0
    return a, b, err


def export_peft(model: MTModel, path: str | os.PathLike, task: int | str | None = None, *, rank: int | None = None,
                calibration: Iterable[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` that ``peft.PeftModel`` loads.

    The scale is folded into B and ``lora_alpha`` equals the rank, so PEFT's alpha/r scaling is 1.
    Returns a report: exactness, relative error of an approximation, rank, target modules.
    """
    from peft import LoraConfig

    factors, report = export_factors(model, task, rank, calibration)
    if not factors:
        raise MergeError(f"method {model.method.name!r} adapts no linear module, so it has no PEFT LoRA form")
    ranks = {name: a.shape[0] for name, (a, _) in factors.items()}
    r = max(ranks.values())
    pattern = {name: k for name, k in ranks.items() if k != r}
    from ..core.targets import linear_module_names

    # names as in the plain base model: drop the ``base_layer`` hops of adapter wrappers (block wrappers hold
    # e.g. mlp.base_layer.down_proj, which PEFT will see as mlp.down_proj)
    targets = _target_module_names(
        [n.replace(".base_layer", "") for n in linear_module_names(model.base_model)], list(factors)
    )
    base_cfg = getattr(model.base_model, "config", None)
    lora_config = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
        task_type=_task_type(model.base_model),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        base_model_name_or_path=getattr(base_cfg, "_name_or_path", None) or None,
        inference_mode=True,
    )
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.float().contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.float().contiguous().cpu()
    for key, value in tensors.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"refusing to export a non-finite adapter: {key}")
    tid = None if task is None else model.task_index(task)
    report.update({"task": None if tid is None else model.tasks[tid], "method": model.method.name, "r": r,
                   "target_modules": targets, "modules": len(factors)})

    def write(tmp: Path) -> None:
        lora_config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "mtpeft_export.json").write_text(json.dumps(report, indent=2, default=str))

    atomic_write_dir(path, write)
    return report
