"""Spectral regularizers on expert up-projections (mtLoRA's spectral-aware regularization, both readings)."""

from __future__ import annotations

import math

import torch


def spectral_released(matrices: list[torch.Tensor], step: int = 0,
                      max_matrices: int = 64) -> torch.Tensor | None:
    """The spectral regularizer as in the released mtLoRA code, mean over the expert matrices B (d x r).

    For each B: G = B^T B (with gradient), sigma = singular values of B (detached, fp32), w = exp(-sigma /
    (mean sigma + 1e-8)), c = ||B||_F / sqrt(r) + 1e-8 (detached); term = ||(w w^T) * (G - c^2 I)||_F^2 (w
    indexes singular values but weights Gram columns, the released code's heuristic pairing). With more than
    ``max_matrices`` matrices a random subset of that size is used, drawn from a generator seeded by
    ``step``.
    """
    if not matrices:
        return None
    if len(matrices) > max_matrices:
        gen = torch.Generator().manual_seed(int(step))
        idx = torch.randperm(len(matrices), generator=gen)[:max_matrices].tolist()
        matrices = [matrices[i] for i in sorted(idx)]
    terms = []
    for b in matrices:
        r = b.shape[1]
        gram = b.t() @ b
        with torch.no_grad():
            sigma = torch.linalg.svdvals(b.detach().float())
            w = torch.exp(-sigma / (sigma.mean() + 1e-8)).to(b.dtype)
            c = torch.linalg.norm(b.detach()) / math.sqrt(r) + 1e-8
        eye = torch.eye(r, device=b.device, dtype=b.dtype) * c**2
        terms.append((((gram - eye) * w[None, :] * w[:, None]) ** 2).sum())
    return torch.stack(terms).mean()


def spectral_paper(expert_sets: list[torch.Tensor]) -> torch.Tensor | None:
    """Paper-intent spectral regularizer: orthogonalize the low-singular-value directions across experts.

    For each adapter with experts B_1..B_E (E, d, r): B_i = U_i S_i V_i^T, w_{i,k} = exp(-s_{i,k} / mean_k
    s_{i,k}) (SVD detached: weights and directions are constants of the step) and the term is
    sum_{i != j} sum_k w_{i,k} ||u_{i,k}^T B_j||^2: B_j is pushed out of expert i's weak (low-SV, heavily
    weighted) directions while its dominant, shared ones (small weight) stay free. Mean over adapters.
    """
    values = []
    for bs in expert_sets:
        experts = bs.shape[0]
        if experts < 2:
            continue
        with torch.no_grad():
            u, s, _ = torch.linalg.svd(bs.detach().float(), full_matrices=False)  # (E, d, r), (E, r)
            w = torch.exp(-s / (s.mean(-1, keepdim=True) + 1e-8))
        proj = torch.einsum("idk,jdr->ijkr", u.to(bs.dtype), bs)  # u_{i,k}^T B_j: (E, E, r, r)
        energy = (proj**2).sum(-1)  # (E_i, E_j, r)
        off = ~torch.eye(experts, dtype=torch.bool, device=bs.device)
        values.append((energy * w.to(bs.dtype)[:, None, :])[off].sum())
    if not values:
        return None
    return torch.stack(values).mean()


#: The released BBH scripts' ``spectral_reg_steps``: the period used when the run length is not known.
UNKNOWN_RUN_PERIOD = 500


def run_relative_steps(total_steps: int, firings: int) -> list[int]:
    """The optimizer steps (0-based: completed steps) at which a term fired ``firings`` times per run of
    ``total_steps`` steps applies: evenly inside the run, k * total // (firings + 1) for k = 1..firings (one
    firing: the middle of the run, as the released scripts' 500 of ~844 steps per epoch)."""
    total, n = int(total_steps), int(firings)
    return sorted({min(total - 1, k * total // (n + 1)) for k in range(1, n + 1)}) if total > 0 and n > 0 else []


def spectral_due(step: int, every: int | None, total_steps: int | None = None, firings: int = 1) -> bool:
    """Whether a spectral term applies at ``step`` (= completed optimizer steps). ``every``: after every
    ``every`` steps, ``(step + 1) % every == 0`` (the released trainer's rule); None: ``firings`` times per run
    (:func:`run_relative_steps`) when ``total_steps`` is known, else every :data:`UNKNOWN_RUN_PERIOD` steps."""
    if every is None:
        if total_steps:
            return int(step) in run_relative_steps(total_steps, firings)
        every = UNKNOWN_RUN_PERIOD
    return (int(step) + 1) % every == 0
