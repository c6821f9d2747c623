"""Check a PEFT export by loading it: PEFT's logits on a probe batch against the MTModel's own.

What an export claims ("exact") is measured, not assumed: the export is loaded with ``peft.PeftModel`` onto a
copy of the base model without mtpeft's adapter layers, whose modules_to_save are zeroed first (the trained
values live only in the MTModel, so a module the export leaves out shows as a difference). Both run in fp32: a
bf16/fp16 model is compared through an fp32 copy (PEFT runs its adapters in fp32 and mtpeft in the base's
dtype, which alone moves bf16 logits by several units), up to ``MAX_UPCAST_PARAMETERS``.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

import torch
from torch import nn

from ..core.targets import set_submodule

#: The largest max-abs logit difference of an exact export, relative to the largest logit (at least 1): fp32
#: rounding.
EXACT_TOLERANCE = 1e-4
#: The largest low-precision model that is checked through an fp32 copy (two copies are held for the check).
MAX_UPCAST_PARAMETERS = 2_000_000_000


def plain_base_copy(model: nn.Module) -> nn.Module | None:
    """A copy of the MTModel's base model with its adapter layers taken out and its modules_to_save zeroed, or
    None where the base cannot be copied (a quantized one) or an adapter layer keeps no ``base_layer``."""
    try:
        base = copy.deepcopy(model.base_model)
    except Exception:  # noqa: BLE001 - e.g. quantized weights that do not deep-copy: no check, said so
        return None
    for name in sorted(model.adapter_layers, key=len, reverse=True):  # inner wrappers before the outer ones
        inner = getattr(base.get_submodule(name), "base_layer", None)
        if inner is None:
            return None
        set_submodule(base, name, inner)
    with torch.no_grad():
        for name in model._saved_module_names:  # noqa: SLF001 - the modules_to_save, by full name
            for p in base.get_submodule(name).parameters():
                p.zero_()
    return base.eval()


def probe_batch(model: nn.Module, length: int = 12) -> dict[str, torch.Tensor]:
    """Two rows of fixed random token ids (the second one padded at the end)."""
    vocab = int(getattr(model.config, "vocab_size", 0) or 100)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return {"input_ids": ids.to(model.device), "attention_mask": mask.to(model.device)}


def _logits(out: Any) -> torch.Tensor | None:
    logits = getattr(out, "logits", None)
    return logits.float() if isinstance(logits, torch.Tensor) else None


def check_peft_export(model: nn.Module, folder: str | os.PathLike, task_id: int | None) -> dict[str, Any]:
    """Load the export in ``folder`` with PEFT and compare its logits with the MTModel's for ``task_id`` on
    :func:`probe_batch`: ``{"checked", "max_logit_diff", "tolerance", "within_tolerance"}`` (or ``checked: False``
    and why, where no plain copy of the base model can be made)."""
    from peft import PeftModel

    if next(model.parameters()).dtype not in (torch.float32, torch.float64):
        if model.num_parameters() > MAX_UPCAST_PARAMETERS:
            return {"checked": False, "why": f"a low-precision model of more than {MAX_UPCAST_PARAMETERS:,} "
                                             f"parameters is not copied to fp32 for the check"}
        try:
            model = copy.deepcopy(model).float()
        except Exception:  # noqa: BLE001 - e.g. quantized weights: no check, said so
            return {"checked": False, "why": "the model cannot be copied to fp32 (quantized?)"}
    base = plain_base_copy(model)
    if base is None:
        return {"checked": False, "why": "no plain copy of the base model (quantized, or an adapter layer that "
                                         "keeps no base_layer)"}
    batch = probe_batch(model)
    if task_id is None and model.method.task_ids_at_inference:
        task_id = 0  # a global update is the same for every task
    task_ids = None if task_id is None else torch.full((2,), task_id, dtype=torch.long, device=model.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = _logits(model(**batch, task_ids=task_ids))
            with warnings.catch_warnings():
                # PEFT (0.21) reads transformers' deprecated is_gradient_checkpointing while it loads: not the
                # user's code, and not something they can act on
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                loaded = PeftModel.from_pretrained(base, str(folder)).eval()
            got = _logits(loaded(**batch))
    finally:
        model.train(was_training)
    if ref is None or got is None:
        return {"checked": False, "why": "the model returns no logits"}
    valid = batch["attention_mask"].bool()
    diff = float((got - ref).abs()[valid].max())
    tolerance = EXACT_TOLERANCE * max(1.0, float(ref[valid].abs().max()))
    return {"checked": True, "max_logit_diff": diff, "tolerance": tolerance, "within_tolerance": diff <= tolerance}
