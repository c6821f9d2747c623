"""Adapter-space task alignment: how far apart the tasks' representations z = A x are in each adapted layer.

Align-LoRA trains a loss that pulls the tasks' down-projection outputs z = A x together; this diagnostic measures
the same quantity after training, for any run whose layers have a plain LoRA down-projection (a 2-D ``lora_A``,
r x d_in, on an adapted linear: LoRA, Align-LoRA, ThanoRA, HydraLoRA, MTL-LoRA, MoE-LoRA), so a LoRA run and an
Align-LoRA run can be compared on the same batches. A forward pass (eval mode: no dropout) over a few batches per
task records z per layer; the per-task batches are padded to one width on the side the collator pads, as a mixed
training batch is.

Per layer and task pair:

- ``mmd``: the method's own alignment loss (:func:`mtpeft.methods.align_lora.alignment_loss`, multi-kernel
  biased MMD^2, the run's bandwidths and pooling, or Align-LoRA's defaults for other methods) between all of the
  two tasks' samples. It is 0 for identical sample sets; two finite samples of one distribution give a small
  positive value (the biased estimator's diagonal terms).
- ``mean_distance_ratio``: the distance between the two task means of z relative to the within-task spread,
  sqrt(sum ||mu_t - mu_u||^2 / sum (s_t^2 + s_u^2) / 2), with s^2 a task's mean squared distance from its mean;
  per position for ``position`` pooling, the sums over the positions where both tasks have >= 2 samples. Unlike
  the MMD it does not change when z is rescaled, so it tells a shrinking A (MMD down, ratio unchanged) from
  tasks that really moved together (both down).

Per layer also: ``within_mmd``, the same MMD between the two halves of each task's own samples (averaged over
tasks), a reference for the between-task value (half-size sets: about twice the null bias of the full sets), and
``z_rms``, the root-mean-square entry of z over all non-padding tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layers import LinearAdapter
from ..methods.align_lora import MMD_BANDWIDTHS, alignment_loss
from .common import BatchesByTask, Diagnostic, heatmap, pairs, pyplot, save_figure, short_name, to_device


@dataclass
class AdapterFeatures:
    """Every down-projection layer's z = A x per task: ``layers[layer][task] = (z (N, n, r), mask (N, n))``,
    float64 on the CPU; ``left_padded``: the batches were padded on the left (positions align at the end)."""

    layers: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    left_padded: bool = False


def down_projection_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Adapted linears with a plain down-projection: a 2-D ``lora_A`` parameter (r x d_in) applied to the linear's
    input, z = A x. (mtLoRA's block adapters are left out: their A may read a tapped input, not the block's.)"""
    out = {}
    for name, layer in model.adapter_layers.items():
        a = getattr(layer, "lora_A", None)
        if isinstance(layer, LinearAdapter) and isinstance(a, torch.Tensor) and a.dim() == 2 \
                and a.shape[1] == layer.in_features:
            out[name] = layer
    return out


def _left_padded(mask: torch.Tensor) -> bool:
    """Whether a batch's padding is on the left (some row starts with padding, every row ends with a token)."""
    return bool((mask[:, 0] == 0).any()) and bool((mask[:, -1] != 0).all())


def _pad(z: torch.Tensor, mask: torch.Tensor, width: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    extra = width - z.shape[1]
    if extra <= 0:
        return z, mask
    side = (extra, 0) if left else (0, extra)
    return F.pad(z, (0, 0, *side)), F.pad(mask, side)


def _stack(parts: list[tuple[torch.Tensor, torch.Tensor]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(z.shape[1] for z, _ in parts)
    padded = [_pad(z, m, width, left) for z, m in parts]
    return torch.cat([z for z, _ in padded]), torch.cat([m for _, m in padded])


@torch.no_grad()
def collect_adapter_features(model: nn.Module, batches: BatchesByTask) -> AdapterFeatures:
    """Every down-projection layer's z = A x over all of each task's batches (eval mode), padded to one width on
    the side the batches were padded, with the token masks."""
    layers = down_projection_layers(model)
    store: dict[str, dict[str, list[tuple[torch.Tensor, torch.Tensor]]]] = {n: {} for n in layers}
    current: dict[str, Any] = {"task": "", "mask": None}
    left = False

    def make_capture(name: str):
        def capture(layer: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            z = F.linear(x.to(layer.lora_A.dtype), layer.lora_A).double().cpu()
            if z.dim() == 2:
                z = z[:, None]
            z = z.reshape(z.shape[0], -1, z.shape[-1])
            mask = current["mask"]
            if mask is None or tuple(mask.shape) != tuple(z.shape[:2]):
                mask = torch.ones(z.shape[:2], dtype=torch.float64)
            store[name].setdefault(current["task"], []).append((z, mask))

        return capture

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    handles = [layer.register_forward_pre_hook(make_capture(name)) for name, layer in layers.items()]
    try:
        for task, task_batches in batches.items():
            current["task"] = task
            for batch in task_batches:
                batch = to_device(batch, device)
                mask = batch.get("attention_mask")
                current["mask"] = None if mask is None else mask.double().cpu()
                left = left or (mask is not None and _left_padded(mask))
                model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "task_ids")})
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return AdapterFeatures({name: {t: _stack(parts, left) for t, parts in by_task.items()}
                            for name, by_task in store.items() if by_task}, left)


def _pooled(z: torch.Tensor, mask: torch.Tensor, pooling: str) -> tuple[torch.Tensor, torch.Tensor]:
    if pooling != "mean":
        return z, mask
    count = mask.sum(1, keepdim=True)
    pooled = (z * mask[..., None]).sum(1, keepdim=True) / count.clamp_min(1)[..., None]
    return pooled, (count > 0).to(mask.dtype)


def mean_distance_ratio(za: torch.Tensor, ma: torch.Tensor, zb: torch.Tensor, mb: torch.Tensor,
                        pooling: str = "position", left_padded: bool = False) -> float:
    """sqrt(mean ||mu_a - mu_b||^2 / mean (s_a^2 + s_b^2) / 2) of two tasks' features (N, n, r) with masks (N, n):
    mu a task's mean of z and s^2 its mean squared distance from it (unbiased), per position (``position``) or on
    per-sample token means (``mean``); both means run over the positions where each task has >= 2 samples. Summing
    before dividing keeps the positions where a prompt template gives every sample of a task the same token (no
    spread) from dividing by zero. NaN where no position qualifies or nothing varies."""
    width = max(za.shape[1], zb.shape[1])
    (za, ma), (zb, mb) = _pad(za, ma, width, left_padded), _pad(zb, mb, width, left_padded)
    za, ma = _pooled(za, ma, pooling)
    zb, mb = _pooled(zb, mb, pooling)

    def moments(z: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        count = m.sum(0)  # (n,)
        mean = (z * m[..., None]).sum(0) / count.clamp_min(1)[:, None]
        spread = (((z - mean) ** 2).sum(-1) * m).sum(0) / (count - 1).clamp_min(1)
        return mean, spread, count

    mu_a, s_a, n_a = moments(za, ma)
    mu_b, s_b, n_b = moments(zb, mb)
    valid = (n_a >= 2) & (n_b >= 2)
    within = float(((s_a + s_b) / 2)[valid].sum())
    if not bool(valid.any()) or within <= 0:
        return float("nan")
    between = float(((mu_a - mu_b) ** 2).sum(-1)[valid].sum())
    return math.sqrt(between / within)


def task_mmd(za: torch.Tensor, ma: torch.Tensor, zb: torch.Tensor, mb: torch.Tensor, *, pooling: str = "position",
             bandwidths: list[float] | None = None, left_padded: bool = False) -> float:
    """Align-LoRA's MMD between two tasks' features (N, n, r) with masks (N, n), as its training loss computes it
    on one mixed batch of both (padded to one width on the left or the right)."""
    z, mask = _stack([(za, ma), (zb, mb)], left_padded)
    ids = torch.cat([torch.zeros(za.shape[0], dtype=torch.long), torch.ones(zb.shape[0], dtype=torch.long)])
    return float(alignment_loss(z, ids, mask, kind="mmd", pooling=pooling, bandwidths=bandwidths, num_tasks=2))


def _method_settings(model: nn.Module, pooling: str | None, bandwidths: list[float] | None) -> tuple[str, list[float]]:
    cfg = getattr(model, "adapter_config", None)
    pooling = pooling or getattr(cfg, "align_pooling", None) or "position"
    bandwidths = list(bandwidths or getattr(cfg, "mmd_bandwidths", None) or MMD_BANDWIDTHS)
    return pooling, bandwidths


def alignment_stats(features: AdapterFeatures, *, pooling: str = "position",
                    bandwidths: list[float] | None = None) -> dict[str, Any]:
    """Per-layer numbers from :func:`collect_adapter_features`: pairwise MMD and mean-distance ratio, within-task
    (split-half) MMD and z's rms, plus their means over layers (``summary``)."""
    layers_out = []
    tasks: list[str] = []
    left = features.left_padded
    for name, by_task in features.layers.items():
        tasks = list(by_task)
        mmd = [[0.0] * len(tasks) for _ in tasks]
        ratio = [[0.0] * len(tasks) for _ in tasks]
        for i, j in pairs(len(tasks)):
            (za, ma), (zb, mb) = by_task[tasks[i]], by_task[tasks[j]]
            mmd[i][j] = mmd[j][i] = task_mmd(za, ma, zb, mb, pooling=pooling, bandwidths=bandwidths, left_padded=left)
            ratio[i][j] = ratio[j][i] = mean_distance_ratio(za, ma, zb, mb, pooling, left)
        within = []
        for z, m in by_task.values():
            half = z.shape[0] // 2
            if half >= 1:
                within.append(task_mmd(z[:half], m[:half], z[half:], m[half:], pooling=pooling,
                                       bandwidths=bandwidths, left_padded=left))
        tokens = sum(float(m.sum()) for _, m in by_task.values())
        squares = sum(float(((z**2).sum(-1) * m).sum()) for z, m in by_task.values())
        r = next(iter(by_task.values()))[0].shape[-1]
        pair_idx = pairs(len(tasks))
        layers_out.append({
            "layer": name,
            "mmd": _mean([mmd[i][j] for i, j in pair_idx]),
            "mean_distance_ratio": _mean([ratio[i][j] for i, j in pair_idx]),
            "within_mmd": _mean(within),
            "z_rms": math.sqrt(squares / max(tokens * r, 1.0)),
            "pair_mmd": mmd,
            "pair_ratio": ratio,
        })
    summary = {key: _mean([e[key] for e in layers_out]) for key in ("mmd", "mean_distance_ratio", "within_mmd",
                                                                        "z_rms")}
    n = len(tasks)
    mean_pairs = [[_mean([e["pair_mmd"][i][j] for e in layers_out]) for j in range(n)] for i in range(n)]
    return {"tasks": tasks, "pooling": pooling, "bandwidths": list(bandwidths or MMD_BANDWIDTHS),
            "layers": layers_out, "summary": summary, "pair_mmd": mean_pairs}


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def adapter_alignment(model: nn.Module, batches: BatchesByTask, *, pooling: str | None = None,
                      bandwidths: list[float] | None = None) -> Diagnostic:
    """The adapter-space task alignment diagnostic of an MTModel from a few batches per task. ``pooling`` and
    ``bandwidths`` default to the run's Align-LoRA settings (Align-LoRA's defaults for other methods)."""
    pooling, bandwidths = _method_settings(model, pooling, bandwidths)
    layers = down_projection_layers(model)
    tasks = list(batches)
    if not layers or len(tasks) < 2:
        why = "needs at least two tasks" if layers else "the method has no plain LoRA down-projection (lora_A)"
        return Diagnostic(name="alignment", title=TITLE, description=DESCRIPTION, applicable=False, note=why)
    data = alignment_stats(collect_adapter_features(model, batches), pooling=pooling, bandwidths=bandwidths)
    s = data["summary"]
    rows = [["(mean over layers)", s["mmd"], s["within_mmd"], s["mean_distance_ratio"], s["z_rms"]]]
    rows += [[short_name(e["layer"]), e["mmd"], e["within_mmd"], e["mean_distance_ratio"], e["z_rms"]]
             for e in data["layers"]]
    diag = Diagnostic(
        name="alignment", title=TITLE, description=DESCRIPTION,
        header=["layer", "inter-task MMD", "within-task MMD (halves)", "mean-distance ratio", "z rms"],
        rows=rows, data=data,
        note=f"pooling `{pooling}`, {len(bandwidths)} MMD bandwidths; {len(tasks)} tasks, {len(layers)} layers",
    )
    diag.plot = lambda path: _plot_alignment(diag, path)
    return diag


TITLE = "Adapter-space task alignment (z = A x)"
DESCRIPTION = (
    "Per adapted layer, the tasks' down-projection outputs z = A x (eval mode), pooled as Align-LoRA pools them. "
    "`inter-task MMD`: Align-LoRA's multi-kernel MMD^2 between two tasks' samples, mean over task pairs (0 = "
    "identical samples; lower = more aligned); `within-task MMD`: the same between the two halves of one task's "
    "samples (a noise reference; half-size sets carry about twice the estimator's bias); `mean-distance ratio`: "
    "distance between task means over the within-task spread, mean over pairs (scale-free: unchanged by a "
    "rescaled A); `z rms`: the size of z."
)


def _plot_alignment(diag: Diagnostic, path: Path) -> None:
    plt = pyplot()
    layers = diag.data["layers"]
    xs = list(range(len(layers)))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), gridspec_kw={"width_ratios": [2, 2, 1.2]})
    axes[0].plot(xs, [e["mmd"] for e in layers], marker=".", label="inter-task (mean over pairs)")
    axes[0].plot(xs, [e["within_mmd"] for e in layers], marker=".", ls="--", color="gray",
                 label="within-task (split halves)")
    axes[0].set_ylabel("MMD^2 (Align-LoRA's kernel)")
    axes[0].set_title("task MMD of z = A x per layer")
    axes[0].legend(fontsize=8)
    axes[1].plot(xs, [e["mean_distance_ratio"] for e in layers], marker=".", color="tab:red")
    axes[1].set_ylabel("||mu_t - mu_u|| / within-task spread")
    axes[1].set_title("distance between task means, relative to spread")
    for ax in axes[:2]:
        ax.set_xlabel("adapted layer (index, in model order)")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    matrix = diag.data["pair_mmd"]
    top = max((v for row in matrix for v in row if not math.isnan(v)), default=1.0) or 1.0
    heatmap(axes[2], matrix, diag.data["tasks"], "inter-task MMD, mean over layers", vmin=0.0, vmax=top)
    save_figure(fig, path)
