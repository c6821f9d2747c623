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

    def validate(self) -> None:
        super().validate()
        if self.align_loss not in ("kl", "mmd"):
            raise ConfigError(f"AlignLoRAConfig.align_loss must be one of ['kl', 'mmd'], got {self.align_loss!r}")
        if self.align_pooling not in ("position", "mean"):
            raise ConfigError(f"AlignLoRAConfig.align_pooling must be one of ['position', 'mean'], "
                              f"got {self.align_pooling!r}")
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


def gaussian_kl_divergence(z_t: torch.Tensor, m_t: torch.Tensor, z_u: torch.Tensor, m_u: torch.Tensor,
                           eps: float = 1e-8) -> torch.Tensor | None:
    """Symmetric KL between per-position diagonal Gaussians fitted to two groups; None if no position has
    two samples in both groups. Shapes: z (N, n, r), m (N, n). Summed over r, averaged over valid positions."""
    stats = []
    for z, m in ((z_t, m_t), (z_u, m_u)):
        count = m.sum(0)  # (n,)
        mean = (z * m[..., None]).sum(0) / count.clamp_min(1)[:, None]
        var = (((z - mean) ** 2) * m[..., None]).sum(0) / (count - 1).clamp_min(1)[:, None]
        stats.append((count, mean, var + eps))
    (c_t, mu_t, v_t), (c_u, mu_u, v_u) = stats
    valid = (c_t >= 2) & (c_u >= 2)
    if not valid.any():
        return None
    diff2 = (mu_t - mu_u) ** 2
    kl_tu = 0.5 * (torch.log(v_u) - torch.log(v_t) + (v_t + diff2) / v_u - 1)
    kl_ut = 0.5 * (torch.log(v_t) - torch.log(v_u) + (v_u + diff2) / v_t - 1)
    per_position = (0.5 * (kl_tu + kl_ut)).sum(-1)
    return per_position[valid].mean()


def mmd_divergence(z_t: torch.Tensor, m_t: torch.Tensor, z_u: torch.Tensor, m_u: torch.Tensor,
                   bandwidths: list[float]) -> torch.Tensor | None:
    """Biased multi-kernel MMD^2 per position between two groups, averaged over positions both groups have."""
    valid = (m_t.sum(0) > 0) & (m_u.sum(0) > 0)
    if not valid.any():
        return None
    a, b = z_t.transpose(0, 1)[valid], z_u.transpose(0, 1)[valid]  # (n', N, r)
    wa, wb = m_t.transpose(0, 1)[valid], m_u.transpose(0, 1)[valid]  # (n', N)
    sig = torch.tensor(bandwidths, device=a.device, dtype=a.dtype)

    def kernel_mean(x, wx, y, wy):
        d2 = torch.cdist(x, y) ** 2  # (n', Nx, Ny)
        k = torch.exp(-d2[..., None] / (2 * sig)).sum(-1)
        w = wx[:, :, None] * wy[:, None, :]
        return (k * w).sum((1, 2)) / w.sum((1, 2))

    mmd = kernel_mean(a, wa, a, wa) + kernel_mean(b, wb, b, wb) - 2 * kernel_mean(a, wa, b, wb)
    return mmd.mean()


def alignment_loss(z: torch.Tensor, task_ids: torch.Tensor, mask: torch.Tensor | None, *, kind: str = "kl",
                   pooling: str = "position", bandwidths: list[float] | None = None,
                   eps: float = 1e-8) -> torch.Tensor | None:
    """Mean divergence over all pairs of tasks present in the batch (KL: tasks with at least 2 samples)."""
    z, mask = _as_sequence(z, mask, pooling)
    min_count = 2 if kind == "kl" else 1
    groups = [(t, task_ids == t) for t in torch.unique(task_ids).tolist()]
    groups = [(t, sel) for t, sel in groups if int(sel.sum()) >= min_count]
    values = []
    for i in range(len(groups)):
        for j in range(i + 1, len(groups)):
            si, sj = groups[i][1], groups[j][1]
            if kind == "kl":
                d = gaussian_kl_divergence(z[si], mask[si], z[sj], mask[sj], eps)
            else:
                d = mmd_divergence(z[si], mask[si], z[sj], mask[sj], bandwidths or MMD_BANDWIDTHS)
            if d is not None:
                values.append(d)
    return torch.stack(values).mean() if values else None


def aux_losses(model) -> dict[str, tuple[torch.Tensor, float]]:
    """Alignment loss averaged over adapted modules (modules with no comparable task pair are skipped)."""
    cfg: AlignLoRAConfig = model.adapter_config
    ctx = model.context
    per_module = []
    for layer in model.adapter_layers.values():
        z = getattr(layer, "cached_down", None)
        if z is None:
            continue
        task_ids = ctx.require_task_ids(f"Align-LoRA ({layer.module_name})", z.shape[0])
        value = alignment_loss(z, task_ids, ctx.token_mask, kind=cfg.align_loss, pooling=cfg.align_pooling,
                               bandwidths=cfg.mmd_bandwidths, eps=cfg.eps)
        if value is not None:
            per_module.append(value)
    if not per_module:
        device = model.device
        return {"align": (torch.zeros((), device=device), float(cfg.align_weight))}
    return {"align": (torch.stack(per_module).mean(), float(cfg.align_weight))}


def create_layer(base_layer, config: AlignLoRAConfig, context: TaskContext, name: str) -> AlignLoRALinear:
    """Wrap one linear with an Align-LoRA layer."""
    return AlignLoRALinear(base_layer, config, context, name)


register_method(MethodSpec(
    name="align_lora", config_class=AlignLoRAConfig, create_layer=create_layer, aux_losses=aux_losses,
    merge="global", task_ids_in_training=True,
    description="One shared LoRA plus an inter-task alignment loss on A x; inference is plain LoRA.",
))
