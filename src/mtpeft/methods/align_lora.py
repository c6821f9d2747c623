"""Align-LoRA (Liu et al. 2025): one shared LoRA plus a loss aligning the tasks' adapter representations.

The representation is the down-projection output z = A dropout(x) of every adapted module. Within each
micro-batch, samples are grouped by their explicit task ids (not by position in the batch, as the released
code assumes), padding is masked out, and every pair of tasks is pulled together by a symmetric
diagonal-Gaussian KL (default, weight 0.2) or a multi-kernel MMD (weight 0.01). ``align_pooling='position'``
compares the tasks position by position as the released code does; ``'mean'`` first pools each sample over
its tokens (masked mean), which does not assume the tasks share a sequence layout. Inference is plain LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import distributed
from ..config import ConfigError, MethodSpec, register_method
from ..layers import TaskContext
from .lora import LoRAConfig, LoRALinear

MMD_BANDWIDTHS = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 100.0,
                  1e3, 1e4, 1e5, 1e6]


@dataclass
class AlignLoRAConfig(LoRAConfig):
    """Align-LoRA: LoRA + inter-task alignment of the adapter-space representations."""

    method = "align_lora"
    align_loss: str = field(default="kl", metadata={"help": "'kl' (symmetric diagonal-Gaussian KL) or 'mmd' "
                                                                "(multi-kernel MMD, biased estimator)."})
    align_weight: float | None = field(default=None, metadata={
        "help": "Weight of the alignment loss; default 0.2 for 'kl' and 0.01 for 'mmd' (the released values)."})
    align_pooling: str = field(default="position", metadata={
        "help": "'position': statistics per token position (released code, padding masked); 'mean': pool each "
                "sample's tokens first (masked mean)."})
    mmd_bandwidths: list[float] = field(default_factory=lambda: list(MMD_BANDWIDTHS), metadata={
        "help": "Kernel bandwidths s of k(a,b) = sum_s exp(-|a-b|^2 / (2 s)) (the released code divides by 2s)."})
    eps: float = field(default=1e-8, metadata={"help": "Added to variances in the KL."})
    variance_floor: float = field(default=0.01, metadata={
        "help": "KL: each task's variance is at least this fraction of the batch's overall variance of the "
                "features. Where all of a task's samples share a token at a position (a prompt template), "
                "their variance is 0 and the bare-eps KL explodes (1e7 on a toy run). 0 = the released code."})

    def validate(self) -> None:
        super().validate()
        if self.align_loss not in ("kl", "mmd"):
            raise ConfigError(f"AlignLoRAConfig.align_loss must be one of ['kl', 'mmd'], got {self.align_loss!r}")
        if self.align_pooling not in ("position", "mean"):
            raise ConfigError(f"AlignLoRAConfig.align_pooling must be one of ['position', 'mean'], "
                              f"got {self.align_pooling!r}")
        if not self.variance_floor >= 0:
            raise ConfigError(f"AlignLoRAConfig.variance_floor must be >= 0, got {self.variance_floor!r}")
        if self.align_weight is None:
            self.align_weight = 0.2 if self.align_loss == "kl" else 0.01

    def requires_tasks(self) -> bool:
        return True


class AlignLoRALinear(LoRALinear):
    """LoRA layer that keeps its down-projection output of the last training forward for the alignment loss."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cached_down: torch.Tensor | None = None

    def down(self, x: torch.Tensor) -> torch.Tensor:
        z = super().down(x)
        if self.context.collect:
            self.cached_down = z
        return z

    def clear_cache(self) -> None:
        self.cached_down = None


def _as_sequence(z: torch.Tensor, mask: torch.Tensor | None, pooling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, n, r) features and (b, n) float mask; mean pooling gives n = 1."""
    if z.dim() == 2:
        z = z[:, None, :]
    if mask is None or mask.shape[:2] != z.shape[:2]:
        mask = torch.ones(z.shape[:2], device=z.device)
    mask = mask.to(z.dtype)
    if pooling == "mean":
        z = (z * mask[..., None]).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp_min(1)[..., None]
        mask = (mask.sum(1, keepdim=True) > 0).to(z.dtype)
    return z, mask


def _task_weights(task_ids: torch.Tensor, mask: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """(T, b, n) weights: 1 where sample b belongs to task t and position n is not padding."""
    onehot = torch.nn.functional.one_hot(task_ids.long(), num_tasks).to(mask.dtype)  # (b, T)
    return onehot.T[:, :, None] * mask[None]


def _mean_over_valid(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per task pair (t < u): mean of ``values`` (T, T, n) over valid positions; then the mean over pairs that
    have any valid position (0 when none has)."""
    num_tasks = values.shape[0]
    upper = torch.ones(num_tasks, num_tasks, dtype=torch.bool, device=values.device).triu(1)
    valid = valid & upper[..., None]
    count = valid.sum(-1)
    per_pair = torch.where(valid, values, torch.zeros_like(values)).sum(-1) / count.clamp_min(1)
    has = (count > 0).to(values.dtype)
    return (per_pair * has).sum() / has.sum().clamp_min(1)


def alignment_loss(z: torch.Tensor, task_ids: torch.Tensor, mask: torch.Tensor | None, *, kind: str = "kl",
                   pooling: str = "position", bandwidths: list[float] | None = None, eps: float = 1e-8,
                   num_tasks: int | None = None, variance_floor: float = 0.0) -> torch.Tensor:
    """Mean divergence over all pairs of tasks present in the batch, computed for all pairs at once.

    KL: per position, a diagonal Gaussian per task (masked mean, unbiased masked variance + eps) over that task's
    samples; a position counts for a pair when both tasks have >= 2 samples there; summed over r, averaged over
    positions; with ``variance_floor`` f > 0 each variance is clamped to at least f times the variance of all
    valid features (per rank dimension, detached). MMD: biased multi-kernel MMD^2 per position between the
    tasks' samples (>= 1 each). Returns 0 when no pair of tasks is comparable.
    """
    z, mask = _as_sequence(z, mask, pooling)
    num_tasks = int(num_tasks if num_tasks is not None else int(task_ids.max()) + 1)
    weights = _task_weights(task_ids, mask, num_tasks)  # (T, b, n)
    count = weights.sum(1)  # (T, n)
    if kind == "kl":
        mean = torch.einsum("tbn,bnr->tnr", weights, z) / count.clamp_min(1)[..., None]
        dev2 = (z[None] - mean[:, None]) ** 2  # (T, b, n, r)
        var = torch.einsum("tbn,tbnr->tnr", weights, dev2) / (count - 1).clamp_min(1)[..., None] + eps
        if variance_floor > 0:
            valid_rows = mask.reshape(-1) > 0
            flat = z.reshape(-1, z.shape[-1])[valid_rows]
            if flat.shape[0] >= 2:
                var = torch.maximum(var, variance_floor * flat.detach().var(0, unbiased=True))
        ok = count >= 2
        # Positions without two samples are masked out below; a neutral variance there keeps their (discarded)
        # terms finite, so no NaN leaks into the gradient.
        var = torch.where(ok[..., None], var, torch.ones_like(var))
        diff2 = (mean[:, None] - mean[None]) ** 2  # (T, T, n, r)
        ratio = var[:, None] / var[None]  # var_t / var_u
        kl_tu = 0.5 * (-torch.log(ratio) + ratio + diff2 / var[None] - 1)
        kl_ut = 0.5 * (torch.log(ratio) + 1 / ratio + diff2 / var[:, None] - 1)
        per_position = (0.5 * (kl_tu + kl_ut)).sum(-1)  # (T, T, n)
    else:
        sig = torch.tensor(bandwidths or MMD_BANDWIDTHS, device=z.device, dtype=z.dtype)
        zt = z.transpose(0, 1)  # (n, b, r)
        kernel = torch.exp(-(torch.cdist(zt, zt) ** 2)[..., None] / (2 * sig)).sum(-1)  # (n, b, b)
        cross = torch.einsum("tbn,nbc,ucn->tun", weights, kernel, weights)
        norm = count[:, None] * count[None]  # (T, T, n)
        k_mean = cross / norm.clamp_min(1e-12)
        diag = torch.diagonal(k_mean, dim1=0, dim2=1).T  # (T, n): mean k within each task
        per_position = diag[:, None] + diag[None] - 2 * k_mean
        ok = count >= 1
    valid = ok[:, None] & ok[None]
    return _mean_over_valid(per_position, valid)


def aux_losses(model) -> dict[str, tuple[torch.Tensor, float]]:
    """Alignment loss averaged over adapted modules (modules with no comparable task pair are skipped).

    Under data parallelism the features, task ids and masks of every process are gathered first (one
    collective for all modules), so the loss compares the tasks over the whole global batch.
    """
    cfg: AlignLoRAConfig = model.adapter_config
    ctx = model.context
    layers = [layer for layer in model.adapter_layers.values() if getattr(layer, "cached_down", None) is not None]
    if not layers:
        return {"align": (torch.zeros((), device=model.device), float(cfg.align_weight))}
    features = [layer.cached_down for layer in layers]
    task_ids = ctx.require_task_ids(f"Align-LoRA ({layers[0].module_name})", features[0].shape[0])
    mask = ctx.token_mask
    if distributed.is_distributed():
        widths = [z.shape[-1] for z in features]
        features = list(torch.split(distributed.gather_rows(torch.cat(features, -1)), widths, -1))
        task_ids = distributed.gather_rows(task_ids)
        mask = None if mask is None else distributed.gather_rows(mask)
    per_module = [alignment_loss(z, task_ids, mask, kind=cfg.align_loss, pooling=cfg.align_pooling,
                                 bandwidths=cfg.mmd_bandwidths, eps=cfg.eps, num_tasks=len(cfg.tasks),
                                 variance_floor=cfg.variance_floor)
                  for z in features]
    return {"align": (torch.stack(per_module).mean(), float(cfg.align_weight))}


def create_layer(base_layer, config: AlignLoRAConfig, context: TaskContext, name: str) -> AlignLoRALinear:
    """Wrap one linear with an Align-LoRA layer."""
    return AlignLoRALinear(base_layer, config, context, name)


register_method(MethodSpec(
    name="align_lora", config_class=AlignLoRAConfig, create_layer=create_layer, aux_losses=aux_losses,
    merge="global", task_ids_in_training=True,
    description="One shared LoRA plus an inter-task alignment loss on A x; inference is plain LoRA.",
))
