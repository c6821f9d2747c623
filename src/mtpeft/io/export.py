"""Export to the standard PEFT LoRA format (what PEFT, vLLM and lm-eval load)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..core.layers import peft_export_extras
from ..core.lowrank import Factors
from ..core.targets import linear_module_names
from ..errors import MergeError
from .approx import approximate_factors
from .atomic import atomic_write_dir
from .peft_check import check_peft_export

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


def saved_modules(model: nn.Module) -> list[str]:
    """The modules_to_save by full name, with every module that shares a weight with one of them (tied
    embeddings: PEFT keeps a separate trained copy of each module it saves, so both must be in the export)."""
    base = model.base_model
    names = list(model._saved_module_names)  # noqa: SLF001
    shared = {id(p) for n in names for p in base.get_submodule(n).parameters()}
    for name, module in base.named_modules():
        inside = any(name == n or name.startswith(n + ".") for n in names)
        if not inside and any(id(p) in shared for p in module.parameters(recurse=False)):
            names.append(name)
    return names


def export_factors(model: nn.Module, task: int | str | None, rank: int | None,
                   calibration: Iterable[dict[str, Any]] | None) -> tuple[Factors, dict[str, Any]]:
    """Per-module LoRA factors (A, B with the scale folded into B) of an MTModel for ``task``, and a report.

    Exact for mergeable methods (``MTModel.lora_factors``); with ``rank`` they are truncated to it, and
    input-routed methods go through the approximation (:func:`mtpeft.io.approx.approximate_factors`).
    """
    method = model.method
    if model.merge_kind == "none" and rank is None:
        raise MergeError(method.merge_error or (
            f"method {method.name!r} is input-routed and has no exact plain-LoRA form; pass rank=k (and "
            f"calibration=batches) to export the task's expected update truncated to rank k"
        ))
    if rank is not None:
        return approximate_factors(model, task, rank, calibration)
    return model.lora_factors(task), {"exact": True, "relative_error": 0.0}


def export_peft(model: nn.Module, path: str | os.PathLike, task: int | str | None = None, *, rank: int | None = None,
                calibration: Iterable[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` of an MTModel that ``peft.PeftModel`` loads.

    The scale is folded into B and ``lora_alpha`` equals the rank, so PEFT's alpha/r scaling is 1.
    modules_to_save are written as PEFT writes them (``base_model.model.<module>.weight``, listed in
    ``modules_to_save``). Before the folder is committed PEFT loads it and its logits on a probe batch are
    compared with the model's (``peft_check`` in the report); ``exact`` is true only when they agree, and an
    export that should be exact but disagrees is refused.
    Returns a report: exactness, relative error of an approximation, rank, target modules, the check.
    """
    from peft import LoraConfig

    factors, report = export_factors(model, task, rank, calibration)
    if not factors:
        raise MergeError(f"method {model.method.name!r} adapts no linear module, so it has no PEFT LoRA form")
    ranks = {name: a.shape[0] for name, (a, _) in factors.items()}
    r = max(ranks.values())
    pattern = {name: k for name, k in ranks.items() if k != r}
    # names as in the plain base model: drop the ``base_layer`` hops of adapter wrappers (block wrappers hold
    # e.g. mlp.base_layer.down_proj, which PEFT will see as mlp.down_proj)
    targets = _target_module_names(
        [n.replace(".base_layer", "") for n in linear_module_names(model.base_model)], list(factors)
    )
    base_cfg = getattr(model.base_model, "config", None)
    saved = saved_modules(model)
    peft_options, peft_tensors = peft_export_extras(model.adapter_layers, factors)  # Conv1D, DoRA
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
        modules_to_save=saved or None,
        inference_mode=True,
        **peft_options,
    )
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.float().contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.float().contiguous().cpu()
    tensors.update({f"{PEFT_PREFIX}{k}": v.float().contiguous().cpu() for k, v in peft_tensors.items()})
    for name in saved:  # whole trained modules, in their own dtype
        for key, value in model.base_model.get_submodule(name).state_dict().items():
            tensors[f"{PEFT_PREFIX}{name}.{key}"] = value.detach().cpu().clone()  # tied: no shared memory
    for key, value in tensors.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"refusing to export a non-finite adapter: {key}")
    tid = None if task is None else model.task_index(task)
    report.update({"task": None if tid is None else model.tasks[tid], "method": model.method.name, "r": r,
                   "target_modules": targets, "modules": len(factors), "modules_to_save": saved})

    def write(tmp: Path) -> None:
        lora_config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        check = check_peft_export(model, tmp, tid)
        report["peft_check"] = check
        if report["exact"] and check["checked"] and not check["within_tolerance"]:
            raise MergeError(f"the PEFT export of method {model.method.name!r} does not reproduce the model: PEFT's "
                             f"logits differ by up to {check['max_logit_diff']:.4g} on a probe batch (tolerance "
                             f"{check['tolerance']:.2g}); nothing was written to {path}")
        if check["checked"]:
            report["exact"] = bool(report["exact"] and check["within_tolerance"])
        (tmp / "mtpeft_export.json").write_text(json.dumps(report, indent=2, default=str))

    atomic_write_dir(path, write)
    return report
