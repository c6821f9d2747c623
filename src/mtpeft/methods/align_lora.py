"""Align-LoRA (Liu et al. 2025): one shared LoRA plus a loss aligning the tasks' adapter representations.

The representation is the down-projection output z = A dropout(x) of every adapted module. Within each
micro-batch, samples are grouped by their explicit task ids (not by position in the batch, as the released
code assumes), padding is masked out, and every pair of tasks is pulled together by a multi-kernel MMD
(default, weight 0.01, the released class default) or a symmetric diagonal-Gaussian KL (weight 0.2, what the
released ``train.py`` uses). ``align_pooling='position'`` compares the tasks position by position as the
released code does; ``'mean'`` first pools each sample over its tokens (masked mean), which does not assume the
tasks share a sequence layout. Inference is plain LoRA.

Why MMD is the default: on mixed-task batches a task has only 1-2 samples per micro-batch, so the KL's
per-task variances are estimates from one or two points; at KL 0.2 the term reached 1e4-1e5 in the quick BBH
setting and swamped the LM loss (14 points below plain LoRA on a held-out 5-task mixture, 3 seeds), while the
MMD is bounded. ``preset: released`` gives the released ``train.py`` setting (KL 0.2, no variance floor,
gate/up/down_proj, r 8, alpha 32, dropout 0.1) for reproduction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..config import help_field
from ..core import distributed
from ..core.context import TaskContext
from ..core.packed import unpack_segments
from ..registry import MethodSpec, register_method
from .lora import LoRAConfig, LoRALinear

MMD_BANDWIDTHS = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 100.0,
                  1e3, 1e4, 1e5, 1e6]


@dataclass
class AlignLoRAConfig(LoRAConfig):
    """Align-LoRA: LoRA + inter-task alignment of the adapter-space representations."""

    method = "align_lora"
    align_loss: str = help_field("'mmd' (multi-kernel MMD, biased estimator; default: bounded, what works on mixed "
                                 "batches) or 'kl' (symmetric diagonal-Gaussian KL, the released train.py).",
                                 default="mmd")
    align_weight: float | None = help_field("Weight of the alignment loss; default 0.2 for 'kl' and 0.01 for 'mmd' "
                                            "(the released values).", default=None)
    align_pooling: str = help_field("'position': statistics per token position (released code, padding masked); "
                                    "'mean': pool each sample's tokens first (masked mean).", default="position")
    mmd_bandwidths: list[float] = help_field("Kernel bandwidths s of k(a,b) = sum_s exp(-|a-b|^2 / (2 s)) (the "
                                             "released code divides by 2s).",
                                             default_factory=lambda: list(MMD_BANDWIDTHS))
    eps: float = help_field("Added to variances in the KL.", default=1e-8)
    variance_floor: float = help_field("KL: each task's variance is at least this fraction of the batch's overall "
                                       "variance of the features. Where all of a task's samples share a token at a "
                                       "position (a prompt template), their variance is 0 and the bare-eps KL explodes "
                                       "(1e7 on a toy run). 0 = the released code.", default=0.01)

    #: ``preset: released``: the released train.py (KL 0.2, no variance floor, the MLP projections, r/alpha/dropout)
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "released": {"align_loss": "kl", "align_weight": 0.2, "variance_floor": 0.0, "r": 8, "alpha": 32,
                     "dropout": 0.1, "target_modules": ["gate_proj", "up_proj", "down_proj"]},
    }

    def validate(self) -> None:
        super().validate()
        self.check_choice("align_loss", ("kl", "mmd"))
        self.check_choice("align_pooling", ("position", "mean"))
        self.check_min("variance_floor", 0)
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


def alignment_loss_reference(z: torch.Tensor, task_ids: torch.Tensor, mask: torch.Tensor | None, *,
                             kind: str = "kl", pooling: str = "position", bandwidths: list[float] | None = None,
                             eps: float = 1e-8, num_tasks: int | None = None,
                             variance_floor: float = 0.0) -> torch.Tensor:
    """The plain definition, one module's features ``z`` (b, [n,] r) at a time (training uses the batched
    :func:`alignment_losses`, which the tests check against this): the mean divergence over all pairs of tasks
    present in the batch, computed for all pairs at once.

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


def alignment_losses(z: torch.Tensor, widths: Sequence[int], task_ids: torch.Tensor, mask: torch.Tensor | None, *,
                     kind: str = "kl", pooling: str = "position", bandwidths: list[float] | None = None,
                     eps: float = 1e-8, num_tasks: int | None = None, variance_floor: float = 0.0) -> torch.Tensor:
    """:func:`alignment_loss_reference` of every module at once: ``z`` (b, [n,] sum(widths)) holds the modules'
    features side by side (module m owns ``widths[m]`` consecutive columns); returns the (M,) losses.

    Equal to the per-module reference up to float rounding, and fast on the CPU: per-module calls cost ~30
    small ops each (x 28 modules of a 4-layer Llama, ~100 ms a step, half a LoRA step), and the reference's
    einsums run as batched matmuls over (task, position) pairs of tiny matrices. Here task sums are one GEMM
    with the one-hot task matrix, pairs are the unordered pairs (t < u) of the tasks that can form a valid pair
    at all (the others are masked out by the reference and get no gradient there either), and the symmetric KL
    is written without its cancelling log terms: 0.5 (KL(t||u) + KL(u||t)) = ((v_t - v_u)^2 + (m_t - m_u)^2
    (v_t + v_u)) / (4 v_t v_u) per rank dimension.
    """
    z, mask = _as_sequence(z, mask, pooling)
    b, n, width = z.shape
    num_tasks = int(num_tasks if num_tasks is not None else int(task_ids.max()) + 1)
    onehot = torch.nn.functional.one_hot(task_ids.long(), num_tasks).to(z.dtype)  # (b, T)
    count = onehot.T @ mask  # (T, n)
    ok = count >= (2 if kind == "kl" else 1)
    # One host sync for all modules: the tasks that can be part of a valid (task, task, position) triple.
    active = ok.any(1).nonzero().flatten()
    columns = _column_owner(widths, z)  # (R, M)
    if active.numel() < 2:  # no comparable pair: the reference's loss is 0, and so is its gradient
        return (z.sum((0, 1)) @ columns) * 0
    first, second = active[torch.triu_indices(active.numel(), active.numel(), 1, device=z.device)]  # (P,) each
    valid = ok[first] & ok[second]  # (P, n)
    if kind == "kl":
        masked = z * mask[..., None]
        mean = (onehot.T @ masked.reshape(b, -1)).reshape(num_tasks, n, width) / count.clamp_min(1)[..., None]
        dev2 = (z - mean[task_ids.long()]) ** 2 * mask[..., None]  # each sample against its own task's mean
        var = (onehot.T @ dev2.reshape(b, -1)).reshape(num_tasks, n, width) / (count - 1).clamp_min(1)[..., None]
        var = var + eps
        if variance_floor > 0:
            flat = z.reshape(-1, width)[mask.reshape(-1) > 0]
            if flat.shape[0] >= 2:
                var = torch.maximum(var, variance_floor * flat.detach().var(0, unbiased=True))
        # neutral variance where a task has < 2 samples: finite (discarded) terms, no NaN in the gradient
        var = torch.where(ok[..., None], var, torch.ones_like(var))
        var_t, var_u = var[first], var[second]  # (P, n, R)
        sym_kl = ((var_t - var_u) ** 2 + (mean[first] - mean[second]) ** 2 * (var_t + var_u)) / (var_t * var_u)
        summed = torch.where(valid[..., None], sym_kl, torch.zeros_like(sym_kl)).sum(1) @ columns * 0.25  # (P, M)
    else:
        if len(set(widths)) != 1:
            return torch.stack([alignment_loss_reference(part, task_ids, mask, kind=kind, pooling="position",
                                                         bandwidths=bandwidths, num_tasks=num_tasks)
                                for part in torch.split(z, list(widths), -1)])
        modules, r = len(widths), widths[0]
        # 2 s rounded to z's dtype as the reference's (2 * sig) tensor, kept on the host
        doubled = tuple((2 * torch.tensor(bandwidths or MMD_BANDWIDTHS, dtype=z.dtype)).tolist())
        zt = z.reshape(b, n, modules, r).permute(2, 1, 0, 3).reshape(modules * n, b, r)
        kernel = _MultiKernel.apply(torch.cdist(zt, zt) ** 2, doubled)  # (M n, b, c)
        kernel = kernel.reshape(modules, n, b, b) * (mask.T[:, :, None] * mask.T[:, None, :])
        # sum over samples b of task t and c of task u as two plain GEMMs with the one-hot matrix
        per_b = onehot.T @ kernel.permute(2, 0, 1, 3).reshape(b, -1)  # (T, M n c)
        cross = (per_b.reshape(-1, b) @ onehot).reshape(num_tasks, modules, n, num_tasks)  # (t, M, n, u)
        norm = count.T[None, :, :, None] * count.T[None, :, None, :]  # (1, n, t, u)
        k_mean = cross.permute(1, 2, 0, 3) / norm.clamp_min(1e-12)  # (M, n, t, u)
        diag = torch.diagonal(k_mean, dim1=2, dim2=3)  # (M, n, T)
        per_position = diag[..., first] + diag[..., second] - 2 * k_mean[:, :, first, second]  # (M, n, P)
        summed = torch.where(valid.T[None], per_position, torch.zeros_like(per_position)).sum(1).T  # (P, M)
    pair_count = valid.sum(-1)
    has = (pair_count > 0).to(summed.dtype)[:, None]
    return (summed / pair_count.clamp_min(1)[:, None] * has).sum(0) / has.sum().clamp_min(1)


class _MultiKernel(torch.autograd.Function):
    """k(d2) = sum_s exp(-d2 / s2) over the doubled bandwidths s2 = 2 s (python floats), one at a time.

    The reference broadcasts to (..., S) (19 bandwidths): over all modules' (position, sample, sample) triples
    that is ~17 MiB per intermediate, some ten of them with the backward, where one bandwidth at a time stays
    cache-sized. The derivative sum_s -exp(-d2 / s2) / s2 is accumulated alongside, so the backward is one
    product. Exponents are clamped at log(tiny) + 2: a term the reference computes as anything in [0, e^2 tiny]
    (< 1e-37 in fp32) is e^2 tiny here, because torch's CPU exp runs up to ~10x slower near and below
    log(tiny), where the small bandwidths (1e-6 ...) put nearly every pair of distinct samples.
    """

    @staticmethod
    def forward(ctx: Any, d2: torch.Tensor, doubled: tuple[float, ...]) -> torch.Tensor:
        kernel = torch.zeros_like(d2)
        slope = torch.zeros_like(d2) if d2.requires_grad else None
        term = torch.empty_like(d2)
        floor = math.log(torch.finfo(d2.dtype).tiny) + 2
        for s2 in doubled:
            torch.div(d2, -s2, out=term)
            term.clamp_(min=floor).exp_()
            kernel.add_(term)
            if slope is not None:
                slope.sub_(term / s2)
        ctx.save_for_backward(slope)
        return kernel

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        (slope,) = ctx.saved_tensors
        return (None if slope is None else grad * slope), None


def _column_owner(widths: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """(R, M) 0/1 matrix: column j of the side-by-side features belongs to module m."""
    owner = torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(list(widths)))
    return torch.nn.functional.one_hot(owner, len(widths)).to(device=like.device, dtype=like.dtype)


def alignment_loss(z: torch.Tensor, task_ids: torch.Tensor, mask: torch.Tensor | None, *, kind: str = "kl",
                   pooling: str = "position", bandwidths: list[float] | None = None, eps: float = 1e-8,
                   num_tasks: int | None = None, variance_floor: float = 0.0) -> torch.Tensor:
    """The alignment loss of one module's features ``z`` (b, [n,] r): :func:`alignment_loss_reference`,
    computed by the batched :func:`alignment_losses`."""
    return alignment_losses(z, [z.shape[-1]], task_ids, mask, kind=kind, pooling=pooling, bandwidths=bandwidths,
                            eps=eps, num_tasks=num_tasks, variance_floor=variance_floor)[0]


def aux_losses(model) -> dict[str, tuple[torch.Tensor, float]]:
    """Alignment loss averaged over adapted modules (modules with no comparable task pair are skipped).

    Under data parallelism the features, task ids and masks of every process are gathered first (one
    collective for all modules), so the loss compares the tasks over the whole global batch. Packed rows are
    first laid out as a padded batch, one sample per example (:func:`~mtpeft.core.packed.unpack_segments`), so
    the loss equals that of the same examples in padded rows.
    """
    cfg: AlignLoRAConfig = model.adapter_config
    ctx = model.context
    layers = [layer for layer in model.adapter_layers.values() if getattr(layer, "cached_down", None) is not None]
    if not layers:
        return {"align": (torch.zeros((), device=model.device), float(cfg.align_weight))}
    widths = [layer.cached_down.shape[-1] for layer in layers]
    # all modules side by side: one batched loss computation (and one collective) instead of one per module
    features = torch.cat([layer.cached_down for layer in layers], -1)
    task_ids = ctx.require_task_ids(f"Align-LoRA ({layers[0].module_name})", features.shape[0])
    mask = ctx.token_mask
    if ctx.segment_ids is not None:  # packed rows: one sample per example, laid out as the padded batch has them
        features, mask, task_ids = unpack_segments(features, ctx.segment_ids, task_ids)
    elif task_ids.dim() == 2:
        raise ValueError("Align-LoRA: per-token task_ids need segment_ids (which example each token belongs to) "
                         "to group the samples by task")
    if distributed.is_distributed():
        features = distributed.gather_rows(features)
        task_ids = distributed.gather_rows(task_ids)
        mask = None if mask is None else distributed.gather_rows(mask)
    per_module = alignment_losses(features, widths, task_ids, mask, kind=cfg.align_loss, pooling=cfg.align_pooling,
                                  bandwidths=cfg.mmd_bandwidths, eps=cfg.eps, num_tasks=len(cfg.tasks),
                                  variance_floor=cfg.variance_floor)
    return {"align": (per_module.mean(), float(cfg.align_weight))}


def create_layer(base_layer, config: AlignLoRAConfig, context: TaskContext, name: str) -> AlignLoRALinear:
    """Wrap one linear with an Align-LoRA layer."""
    return AlignLoRALinear(base_layer, config, context, name)


register_method(MethodSpec(
    name="align_lora", config_class=AlignLoRAConfig, create_layer=create_layer, aux_losses=aux_losses,
    merge="global", task_ids_in_training=True,
    description="One shared LoRA plus an inter-task alignment loss on A x; inference is plain LoRA.",
))
