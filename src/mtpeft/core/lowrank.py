"""The low-rank operations every method shares: initializing a down-projection, the adapters' dtype, adding a
low-rank update into a base output in place, and the best rank-k factors of a weight update (SVD)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def init_down_projection(weight: torch.Tensor, init: str, rank: int) -> None:
    """Initialize a down-projection A (rank x d_in) in place: Kaiming-uniform (a=sqrt(5)) or Gaussian (std 1/r)."""
    with torch.no_grad():
        if init == "kaiming":
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(weight, std=1.0 / rank)
        else:
            raise ConfigError(f"unknown init {init!r}; expected 'kaiming' or 'gaussian'")


def adapter_dtype(base_weight: torch.Tensor) -> torch.dtype:
    """Adapters train in fp32 (fp64 on an fp64 base) even over a half-precision base, as PEFT does."""
    return torch.float64 if base_weight.dtype == torch.float64 else torch.float32


def add_low_rank(out: torch.Tensor, z: torch.Tensor, up_t: torch.Tensor, scale: float) -> torch.Tensor:
    """out + scale * z @ up_t, added in place of a separate delta tensor: ``out`` (..., d_out), ``z`` (..., k),
    ``up_t`` (k, d_out) (B^T of a LoRA, or a routed layer's side-by-side expert up-projections)."""
    b_t = up_t.to(out.dtype)
    if out.device.type == "cpu":
        # A contiguous (k, d_out) copy of B^T (k * d_out values): both backward matmuls, dB^T = z^T dy and
        # dz = dy B, then read row-major operands, which MKL runs 2-4x faster for rank-r shapes than the
        # transposed ones autograd picks for a view (measured: -3% tiny-Llama training step time on CPU).
        b_t = b_t.contiguous()
    # One addmm adds s * z B^T into the base output without a separate delta tensor (lean LoRA).
    fused = torch.addmm(out.reshape(-1, out.shape[-1]), z.reshape(-1, z.shape[-1]).to(out.dtype), b_t, alpha=scale)
    return fused.view(out.shape)


def add_update(out: torch.Tensor, z: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """out + scale * z B^T for a layer whose down-projection gave ``z``: by :func:`add_low_rank` when the base
    output has the adapter's dtype; over a half-precision base the update is computed in the adapter's dtype
    and cast, as ``adapter_output`` does."""
    if out.dtype != z.dtype:
        return out + (F.linear(z, lora_b) * scale).to(out.dtype)
    return add_low_rank(out, z, lora_b.t(), scale)


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


def truncate_factors(factors: Factors, rank: int) -> tuple[Factors, float]:
    """Best rank-``rank`` approximation of each B @ A (SVD); returns the factors and the worst relative error."""
    out, worst = {}, 0.0
    for name, (a, b) in factors.items():
        delta = (b.double() @ a.double())
        a2, b2, err = svd_truncate(delta, rank)
        out[name] = (a2.to(a.dtype), b2.to(b.dtype))
        worst = max(worst, err)
    return out, worst


#: Initializations of a LoRA from its base weight (as PEFT's ``init_lora_weights``).
WEIGHT_INITS = ("pissa", "olora")


def factors_from_weight(weight: torch.Tensor, rank: int, scale: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A: r x d_in, B: d_out x r) taken from a base weight (d_out x d_in), computed in fp32 as PEFT does:
    'pissa' gives the top-r singular triplets, A = sqrt(S_r / s) V_r^T and B = U_r sqrt(S_r / s), so that
    s B A is the weight's best rank-r part; 'olora' the first r columns of W's QR decomposition, A = R_r, B = Q_r."""
    w = weight.detach().to(torch.float32)
    if init == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = (s[:rank] / scale).sqrt()
        return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]
    if init == "olora":
        q, r = torch.linalg.qr(w)
        return r[:rank].contiguous(), q[:, :rank].contiguous()
    raise ConfigError(f"unknown weight init {init!r}; expected one of {list(WEIGHT_INITS)}")
