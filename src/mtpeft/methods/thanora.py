"""ThanoRA (Liang et al. 2025): task-specific LoRA subspaces allocated at initialization, kept apart.

**A reconstruction.** Only the abstract and the method figure could be read (``docs/methods.md`` §1), so the
choices below are options, and the defaults are our reading, not the paper's verified recipe:

- Each adapted linear has one LoRA of total rank ``r`` split into per-task blocks (A_t, B_t) of rank r_t,
  sum r_t = r. The forward is plain LoRA (h = W0 x + s B A x), so the model merges once, globally, and
  inference needs no task id.
- ``model.calibrate(batches)`` sets the blocks' ranks per layer from each task's normalized singular-value
  entropy H_t of a statistic of that layer (``complexity='activations'``: the layer's input tokens;
  ``'gradients'``: the task's accumulated gradient of the frozen weight): r_t = round(r H_t / sum_u H_u),
  r_t >= ``min_rank``, rounding fixed so the ranks sum to r. The entropy is normalized by log K, K = min(tokens,
  d_in), so the tasks must be scored on the same K: every task's tokens are deduplicated (a repeated example
  counts once), subsampled to at most ``calibration_tokens`` and then all cut to the smallest task's count before
  the SVD. The allocation is therefore invariant to duplicating one task's calibration data. (The gradient
  statistic is d_out x d_in for every task, so it has one K already.) The allocation lives in a buffer, is
  saved with the adapter and prints as a per-layer table (``allocation_table``).
- ``block_init``: ``'data'`` (default) starts A_t from the top-r_t right singular vectors of task t's
  statistic, orthogonalized across blocks in task order; ``'orthogonal'`` draws all rows from one random
  orthonormal basis; ``'kaiming'`` is LoRA's init. Rows are scaled to Kaiming's expected row norm; B = 0.
- The subspace-preserving regularizer is the block-orthogonality penalty
  sum_{i<j} ||A_i A_j^T||_F^2 + ||B_i^T B_j||_F^2 per layer (``ortho_normalize`` uses unit rows/columns),
  averaged over layers, weight ``ortho_weight``; it keeps the tasks' subspaces apart ("task interference").
- The within-block anti-collapse term (``collapse_weight``, 0.01; 0 = off): sum over each block of the squared
  cosines between its distinct A rows, so a block keeps r_t independent directions. On by default because the
  v2 abstract names "subspace collapse" next to interference as what the "diversity-preserving"
  regularization prevents, which the inter-task term alone does not address; it is scale-free and starts at
  0 under ``block_init`` 'data' / 'orthogonal' (orthonormal rows), so it only acts when a block starts to
  collapse. A reconstruction like the rest.
- ``train_mode='shared'`` (default): every sample goes through every block; ``'task_masked'``: in training a
  sample of task t uses only block t (needs task ids in training). Inference still uses all blocks, on
  purpose: the verified claims are "no additional structure", "CAN MERGE" and zero inference overhead, which
  a task-restricted inference (task ids, one merge per task) would break. So ``task_masked`` is a
  train/inference mismatch by design: a task-t input also gets the other tasks' blocks at inference, which
  it never trained with; the inter-task orthogonality term is what keeps those contributions small. Prefer
  ``shared`` unless you measure otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, help_field
from ..core import distributed
from ..core.calibration import collect_activations, collect_gradients, distinct_token_subsample
from ..core.context import TaskContext, per_sample
from ..core.distributed import whole_tensor
from ..core.layers import LinearAdapter
from ..core.lowrank import add_update, init_down_projection
from ..errors import ConfigError
from ..registry import MethodSpec, register_method

KAIMING_ROW_NORM = 1 / math.sqrt(3)  # expected row norm of kaiming_uniform(a=sqrt(5)) rows


@dataclass
class ThanoRAConfig(AdapterConfig):
    """ThanoRA (reconstruction): per-task rank blocks allocated by SV entropy, block-orthogonality regularizer."""

    method = "thanora"
    complexity: str = help_field("Calibration statistic whose normalized SV entropy sets each task's rank: "
                                 "'activations' (layer inputs) or 'gradients' (accumulated gradient of the frozen "
                                 "weight).", default="activations")
    block_init: str = help_field("'data': A_t from task t's top singular vectors (orthogonalized across blocks); "
                                 "'orthogonal': one random orthonormal basis; 'kaiming': LoRA's init.", default="data")
    ortho_weight: float = help_field("Weight of the block-orthogonality regularizer.", default=0.01)
    ortho_normalize: bool = help_field("Use unit-norm rows of A and columns of B in the regularizer, so only "
                                       "directions count.", default=False)
    train_mode: str = help_field("'shared': all samples use all blocks; 'task_masked': a sample trains only its task's "
                                 "block.", default="shared")
    collapse_weight: float = help_field("Weight of the within-block anti-collapse term: sum over each task block of "
                                        "the squared cosines between its distinct A rows (0 = off).", default=0.01)
    min_rank: int = help_field("Smallest rank a task's block may get.", default=1)
    calibration_tokens: int = help_field("Tokens per task and layer kept for the activation statistic: distinct "
                                         "tokens, a random subset beyond this, then every task cut to the same "
                                         "count.",
                                         default=512)

    def validate(self) -> None:
        super().validate()
        self.check_choice("complexity", ("activations", "gradients"))
        self.check_choice("block_init", ("data", "orthogonal", "kaiming"))
        self.check_choice("train_mode", ("shared", "task_masked"))
        self.check_min("min_rank", 1)
        self.check_min("collapse_weight", 0)
        if self.tasks and self.r < self.min_rank * len(self.tasks):
            raise ConfigError(f"ThanoRAConfig.r={self.r} is too small for {len(self.tasks)} tasks with "
                              f"min_rank={self.min_rank}: r must be >= {self.min_rank * len(self.tasks)}")

    def requires_tasks(self) -> bool:
        return True


def allocate_ranks(scores: list[float], total: int, min_rank: int = 1) -> list[int]:
    """r_t = round(total * s_t / sum s), each >= min_rank, adjusted (largest remainder) to sum to ``total``."""
    n = len(scores)
    if total < n * min_rank:
        raise ValueError(f"cannot give {n} tasks at least {min_rank} of {total} ranks")
    s = [max(float(x), 0.0) for x in scores]
    norm = sum(s)
    quotas = [total * x / norm for x in s] if norm > 0 else [total / n] * n
    ranks = [max(min_rank, int(math.floor(q + 0.5))) for q in quotas]
    while sum(ranks) > total:
        candidates = [i for i in range(n) if ranks[i] > min_rank]
        i = min(candidates, key=lambda k: (quotas[k] - ranks[k], -k))
        ranks[i] -= 1
    while sum(ranks) < total:
        i = max(range(n), key=lambda k: (quotas[k] - ranks[k], -k))
        ranks[i] += 1
    return ranks


def normalized_sv_entropy(singular_values: torch.Tensor) -> float:
    """-sum p log p / log K with p = sigma / sum(sigma), K the number of singular values; in [0, 1]."""
    sv = singular_values.double().clamp_min(0)
    k = sv.numel()
    if k < 2 or sv.sum() <= 0:
        return 0.0
    p = sv / sv.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum() / math.log(k))


class ThanoRALinear(LinearAdapter):
    """One LoRA of rank r whose rank coordinates are partitioned into task blocks by ``rank_offsets``."""

    task_blocks = True

    def __init__(self, base_layer: nn.Linear, config: ThanoRAConfig, context: TaskContext, name: str = "") -> None:
        super().__init__(base_layer, config, context, name)
        self.num_tasks = len(config.tasks)
        self.train_mode = config.train_mode
        self.lora_A = nn.Parameter(torch.empty(config.r, self.in_features, **self.factory_kwargs))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.r, **self.factory_kwargs))
        self.register_buffer("rank_offsets", torch.zeros(self.num_tasks + 1, dtype=torch.long,
                                                         device=self.factory_kwargs["device"]))
        self.register_buffer("task_entropy", torch.zeros(self.num_tasks, dtype=torch.float32,
                                                         device=self.factory_kwargs["device"]))
        self.set_allocation(allocate_ranks([1.0] * self.num_tasks, config.r, config.min_rank))
        if config.block_init == "kaiming":
            init_down_projection(self.lora_A, config.init, config.r)
        else:
            self.init_blocks(None)

    @property
    def task_ranks(self) -> list[int]:
        return torch.diff(self.rank_offsets).tolist()

    def set_allocation(self, ranks: list[int]) -> None:
        """Set the per-task ranks (they must sum to r)."""
        if sum(ranks) != self.lora_A.shape[0] or min(ranks) < 1:
            raise ValueError(f"{self.module_name}: ranks {ranks} must be >= 1 and sum to r={self.lora_A.shape[0]}")
        offsets = torch.tensor([0, *ranks], dtype=torch.long).cumsum(0)
        self.rank_offsets.copy_(offsets.to(self.rank_offsets.device))

    def block_ids(self) -> torch.Tensor:
        """The task that owns each rank coordinate, shape (r,)."""
        ranks = torch.diff(self.rank_offsets)
        return torch.repeat_interleave(torch.arange(self.num_tasks, device=ranks.device), ranks)

    @torch.no_grad()
    def init_blocks(self, directions: list[torch.Tensor | None] | None) -> None:
        """Set A from per-task direction sets (rows; None = random), orthogonalized across blocks in task order."""
        r, d_in = self.lora_A.shape
        if self.lora_A.device.type == "meta":
            return
        rows = []
        for t, k in enumerate(self.task_ranks):
            given = directions[t] if directions is not None else None
            if given is None or given.shape[0] < k:
                rows.append(torch.randn(k, d_in, dtype=torch.float64))
            else:
                rows.append(given[:k].double().cpu())
        stacked = torch.cat(rows, 0)
        if r <= d_in:
            q, rr = torch.linalg.qr(stacked.T)  # Gram-Schmidt in task order keeps earlier blocks' spans
            signs = torch.sign(torch.diagonal(rr))
            signs[signs == 0] = 1
            stacked = (q * signs).T
        else:
            stacked = F.normalize(stacked, dim=1)
        self.lora_A.copy_((stacked * KAIMING_ROW_NORM).to(self.lora_A))

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """A dropout(x), in training with ``task_masked`` restricted to each sample's own task block."""
        z = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)
        if self.train_mode == "task_masked" and self.training:
            ids = self.context.task_ids_for(f"ThanoRA task_masked ({self.module_name})", x)
            mask = (ids[..., None] == self.block_ids()).to(z.dtype)  # (b, r), or (b, seq, r) per token
            z = z * per_sample(mask, z, ids)
        return z

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.down(x), self.lora_B) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """W0 x + s B z, the update added into the base output by one addmm (LoRA's fast path) over an fp32
        base; over a half-precision base the update is computed in fp32 and cast, as ``adapter_output``."""
        out = self.base_layer(x)
        return out if self.merged else add_update(out, self.down(x), self.lora_B, self.scale)

    def lora_factors(self, task: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A, self.lora_B * self.scale

    def orthogonality_penalty(self, normalize: bool) -> torch.Tensor:
        """sum_{i<j} ||A_i A_j^T||_F^2 + ||B_i^T B_j||_F^2 over this layer's task blocks."""
        return block_orthogonality(self.lora_A[None], self.lora_B[None], self.block_ids()[None], normalize)[0]


def _layers(model) -> dict[str, ThanoRALinear]:
    return {n: m for n, m in model.adapter_layers.items() if isinstance(m, ThanoRALinear)}


def block_orthogonality(a: torch.Tensor, b: torch.Tensor, owner: torch.Tensor, normalize: bool) -> torch.Tensor:
    """The penalty for a stack of layers: a (L, r, d_in), b (L, d_out, r), owner (L, r) -> (L,)."""
    if normalize:
        a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-4)
        b = b / b.norm(dim=-2, keepdim=True).clamp_min(1e-4)
    cross = (owner[:, :, None] != owner[:, None, :]).to(a.dtype)
    gram_a = a @ a.transpose(1, 2)
    gram_b = b.transpose(1, 2) @ b
    return 0.5 * ((gram_a**2 * cross).sum((1, 2)) + (gram_b**2 * cross).sum((1, 2)))


def aux_losses(model) -> dict[str, tuple[torch.Tensor, float]]:
    """The block-orthogonality regularizer, averaged over layers (layers of equal shape in one batched op)."""
    cfg: ThanoRAConfig = model.adapter_config
    groups: dict[tuple, list[ThanoRALinear]] = {}
    for layer in _layers(model).values():
        groups.setdefault((tuple(layer.lora_A.shape), tuple(layer.lora_B.shape)), []).append(layer)
    values = [block_orthogonality(torch.stack([whole_tensor(la.lora_A) for la in group]),
                                  torch.stack([whole_tensor(la.lora_B) for la in group]),
                                  torch.stack([la.block_ids() for la in group]), cfg.ortho_normalize)
              for group in groups.values()]
    out = {"orthogonality": (torch.cat(values).mean(), float(cfg.ortho_weight))}
    if cfg.collapse_weight > 0:
        out["collapse"] = (torch.cat([block_collapse(torch.stack([whole_tensor(la.lora_A) for la in group]),
                                                     torch.stack([la.block_ids() for la in group]))
                                      for group in groups.values()]).mean(), float(cfg.collapse_weight))
    return out


def block_collapse(a: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """Within-block anti-collapse for a stack of layers: sum over task blocks of the squared cosines between
    distinct rows of A_t, a (L, r, d_in), owner (L, r) -> (L,); 0 while each block's rows stay orthogonal."""
    unit = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    eye = torch.eye(a.shape[1], dtype=torch.bool, device=a.device)
    same = (owner[:, :, None] == owner[:, None, :]) & ~eye
    cos = unit @ unit.transpose(1, 2)
    return 0.5 * (cos**2 * same.to(a.dtype)).sum((1, 2))


def calibrate(model, batches: Iterable[dict[str, Any]], *, seed: int = 0) -> dict[str, Any]:
    """Allocate each layer's ranks by task SV entropy and initialize the task blocks (before training).

    ``batches``: a few collated batches per task (input_ids, attention_mask, task_ids; labels for gradients).
    Returns ``{layer: {"ranks": [...], "entropy": [...]}}``.
    """
    cfg: ThanoRAConfig = model.adapter_config
    layers = _layers(model)
    batches = list(batches)
    if not batches:
        raise ValueError("ThanoRA calibration needs at least one batch")
    was_training = model.training
    model.eval()
    entropies: dict[str, list[float]] = {n: [0.0] * len(cfg.tasks) for n in layers}
    directions: dict[str, list[torch.Tensor | None]] = {n: [None] * len(cfg.tasks) for n in layers}
    seen = set()
    for b in batches:
        seen.update(b["task_ids"].reshape(-1).tolist())
    missing = [cfg.tasks[t] for t in range(len(cfg.tasks)) if t not in seen]
    if missing:
        raise ValueError(f"ThanoRA calibration batches have no samples of tasks {missing}")
    max_rank = cfg.r
    # Under data parallelism each process runs whole batches, round robin, and the statistics are gathered.
    mine = distributed.split_round_robin(list(enumerate(batches)), distributed.rank(), distributed.world_size())
    names = list(layers)
    per_task = []
    for t in range(len(cfg.tasks)):
        if cfg.complexity == "activations":
            tokens = collect_activations(model, layers, mine, t)
            per_task.append({n: distinct_token_subsample(x, cfg.calibration_tokens, seed * 1_000_003 + 7919 * t
                                                         + names.index(n)) for n, x in tokens.items()})
        else:
            per_task.append(collect_gradients(model, layers, mine, t))
    if cfg.complexity == "activations":  # every task scored on the same scale: the same token count per layer
        for name in names:
            count = min((stats[name].shape[0] for stats in per_task if name in stats), default=0)
            for stats in per_task:
                if name in stats:
                    stats[name] = stats[name][:count]
    for t, stats in enumerate(per_task):
        for name, m in stats.items():
            _, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
            entropies[name][t] = normalized_sv_entropy(s)
            directions[name][t] = vh[:max_rank]
    report = {}
    for name, layer in layers.items():
        ranks = allocate_ranks(entropies[name], cfg.r, cfg.min_rank)
        layer.set_allocation(ranks)
        layer.task_entropy.copy_(torch.tensor(entropies[name], dtype=torch.float32))
        if cfg.block_init == "data":
            layer.init_blocks(directions[name])
        elif cfg.block_init == "orthogonal":
            layer.init_blocks(None)
        report[name] = {"ranks": ranks, "entropy": entropies[name]}
    model.train(was_training)
    return report


def allocation_table(model) -> str:
    """A per-layer Markdown table of each task's rank (and SV entropy)."""
    tasks = model.adapter_config.tasks
    lines = ["| layer | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for name, layer in _layers(model).items():
        cells = [f"{r} ({h:.3f})" for r, h in zip(layer.task_ranks, layer.task_entropy.tolist())]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def create_layer(base_layer, config: ThanoRAConfig, context: TaskContext, name: str) -> ThanoRALinear:
    """Wrap one linear with a ThanoRA layer (equal allocation until ``calibrate``)."""
    return ThanoRALinear(base_layer, config, context, name)


register_method(MethodSpec(
    name="thanora", config_class=ThanoRAConfig, create_layer=create_layer, aux_losses=aux_losses,
    calibrate=calibrate, describe=allocation_table, merge="global",
    description="Task rank blocks allocated by SV entropy, block-orthogonality regularizer; merges globally "
                "(reconstruction).",
))
