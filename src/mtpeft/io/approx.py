"""Approximate plain-LoRA export of input-routed adapters (HydraLoRA, token-gated MoE-LoRA, mtLoRA).

An input-routed adapter has no fixed weight update, so :func:`approximate_factors` builds one per task from
calibration data and measures how well it reproduces the adapter:

- **Component-level routed layers** (HydraLoRA, token-gated MoE-LoRA, mtLoRA ``block_type='component'``): the
  calibration tokens give the expected routing weights E[pi] (per routing group for fine-grained routing); the
  update with routing fixed to them, sum_e E[pi_e] s B_e A (rows of group g use that group's expectation), is
  truncated to rank k by SVD. With routing that does not depend on the input (e.g. a zero router: uniform
  weights) this is exact at full rank.
- **mtLoRA block adapters** (a path around a whole MLP / attention block, not a single linear): the update is
  fitted onto the block's own output linear (``mlp.down_proj``, ``self_attn.o_proj``, BERT's
  ``output.dense``): Delta_W = argmin sum_tokens ||Delta_W h - Delta(u)||^2 + lambda ||Delta_W||^2, with h
  that linear's input and Delta(u) the adapter's output on the same token, i.e. Delta_W = C (H + lambda I)^-1
  with H = sum h h^T, C = sum Delta(u) h^T and lambda = ``ridge`` * trace(H) / dim(h); then truncated to rank
  k by SVD.

A second pass over the calibration data measures the relative error ||approx - true|| / ||true|| of the
adapter outputs on the non-padding tokens, per module and overall (all modules pooled).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layers import AdapterLayer
from ..core.lowrank import Factors, svd_truncate, truncate_factors
from ..errors import MergeError


class _Tokens:
    """The non-padding mask of the batch being run, shared by the probes."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) -> (valid tokens, d)."""
        if self.mask is not None and tuple(x.shape[:-1]) == tuple(self.mask.shape):
            return x[self.mask.to(x.device)]
        return x.reshape(-1, x.shape[-1])


class _Probe:
    """Statistics for one adapter layer; ``export_name`` is the base-model linear the factors belong to."""

    kind = ""

    def __init__(self, name: str, layer: torch.nn.Module, tokens: _Tokens) -> None:
        self.name = name
        self.layer = layer
        self.tokens = tokens
        self.factors: tuple[torch.Tensor, torch.Tensor] | None = None
        self.truncation_error = 0.0
        self.err2 = 0.0
        self.ref2 = 0.0
        self.handles: list[Any] = []

    @property
    def export_name(self) -> str:
        return self.name

    def _accumulate_error(self, x: torch.Tensor, true: torch.Tensor) -> None:
        a, b = self.factors
        x = self.tokens.flat(x).double()
        true = self.tokens.flat(true).double()
        approx = F.linear(F.linear(x, a.double()), b.double())
        self.err2 += float(((approx - true) ** 2).sum())
        self.ref2 += float((true**2).sum())

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class _ComponentProbe(_Probe):
    """A routed linear: expected routing weights, then the fixed-routing update truncated by SVD."""

    kind = "component"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.pi_sum: torch.Tensor | None = None
        self.count = 0

    def attach_stats(self) -> None:
        def hook(module, args):
            pi = self.tokens.flat(module.routing_weights(args[0]).flatten(-2)).double()
            self.pi_sum = pi.sum(0) if self.pi_sum is None else self.pi_sum + pi.sum(0)
            self.count += pi.shape[0]

        self.handles.append(self.layer.register_forward_pre_hook(hook))

    def finalize(self, rank: int) -> None:
        layer = self.layer
        if self.count == 0:
            raise ValueError(f"module {self.name!r} saw no calibration tokens")
        mean_pi = (self.pi_sum / self.count).reshape(layer.num_groups, layer.num_experts)
        self.mean_routing = mean_pi.float().cpu()
        delta = layer.expected_delta_weight(mean_pi).detach().double()
        a, b, self.truncation_error = svd_truncate(delta, rank)
        self.factors = (a, b)

    def attach_error(self) -> None:
        def hook(module, args):
            x = args[0]
            self._accumulate_error(x.to(module.lora_A.dtype), module.adapter_output(x))

        self.handles.append(self.layer.register_forward_pre_hook(hook))


class _BlockProbe(_Probe):
    """A block adapter: least-squares fit of its delta onto the block's output linear, then SVD truncation."""

    kind = "block"

    def __init__(self, *args: Any, ridge: float = 1e-6) -> None:
        super().__init__(*args)
        self.ridge = ridge
        self.h: torch.Tensor | None = None
        self.hh: torch.Tensor | None = None
        self.ch: torch.Tensor | None = None
        self.count = 0

    @property
    def export_name(self) -> str:
        return self.layer.out_linear_name

    def _attach(self, on_pair) -> None:
        def pre_hook(module, args):
            self.h = args[0]

        def observer(layer, u, delta):
            if self.h is None:
                raise RuntimeError(f"block {self.name!r}: its output linear did not run before the adapter")
            h, self.h = self.h, None
            on_pair(h, delta)

        self.handles.append(self.layer.output_linear().register_forward_pre_hook(pre_hook))
        self.handles.append(self.layer.add_delta_observer(observer))

    def attach_stats(self) -> None:
        def on_pair(h, delta):
            x = self.tokens.flat(h).double()
            y = self.tokens.flat(delta).double()
            self.hh = x.t() @ x if self.hh is None else self.hh + x.t() @ x
            self.ch = y.t() @ x if self.ch is None else self.ch + y.t() @ x
            self.count += x.shape[0]

        self._attach(on_pair)

    def finalize(self, rank: int) -> None:
        if self.count == 0:
            raise ValueError(f"block {self.name!r} saw no calibration tokens")
        d = self.hh.shape[0]
        lam = self.ridge * float(torch.trace(self.hh)) / d + 1e-12
        reg = self.hh + lam * torch.eye(d, dtype=self.hh.dtype, device=self.hh.device)
        delta_w = torch.linalg.solve(reg, self.ch.t()).t()  # C (H + lambda I)^-1, H symmetric
        a, b, self.truncation_error = svd_truncate(delta_w, rank)
        self.factors = (a, b)
        self.hh = self.ch = None

    def attach_error(self) -> None:
        self._attach(lambda h, delta: self._accumulate_error(h, delta))

    def remove(self) -> None:
        super().remove()
        self.h = None


def _export_kind(layer: nn.Module) -> str:
    """The layer's declared ``export_kind`` ('none' for a module that is no AdapterLayer)."""
    return layer.export_kind if isinstance(layer, AdapterLayer) else "none"


def _row_select(batch: dict[str, Any], rows: torch.Tensor | None) -> dict[str, Any]:
    if rows is None:
        return dict(batch)
    n = rows.shape[0]
    return {k: v[rows.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
            for k, v in batch.items()}


def _run(model: nn.Module, batches: list[dict[str, Any]], tid: int | None, tokens: _Tokens) -> int:
    """Forward the calibration rows of task ``tid`` (all rows if None); returns the number of valid tokens."""
    seen = 0
    device = model.device
    with torch.no_grad():
        for batch in batches:
            if "input_ids" not in batch:
                raise ValueError(f"calibration batches need input_ids; got keys {sorted(batch)}")
            n = batch["input_ids"].shape[0]
            ids = None
            if batch.get("task_ids") is not None and model.tasks:
                ids = model.resolve_task_ids(batch["task_ids"], n, device)
            rows = None
            if tid is not None:
                if ids is None:
                    raise ValueError("approximating the update of one task needs task_ids in the calibration "
                                     "batches (to select that task's rows)")
                rows = ids == tid
                if not bool(rows.any()):
                    continue
            sel = _row_select({k: v for k, v in batch.items() if k not in ("labels", "task_ids")}, rows)
            sel = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in sel.items()}
            mask = sel.get("attention_mask")
            tokens.mask = mask.bool() if mask is not None else None
            seen += int(tokens.mask.sum()) if tokens.mask is not None else int(sel["input_ids"].numel())
            task_ids = None if ids is None else (ids if rows is None else ids[rows])
            model(**sel, task_ids=task_ids)
    tokens.mask = None
    return seen


def _truncated_exact_factors(model: nn.Module, task: int | str | None, rank: int) -> tuple[Factors, dict[str, Any]]:
    """A mergeable method's exact factors truncated to ``rank`` by SVD, and the worst relative Frobenius error of
    the weight update the truncated export gives each layer (through ``delta_from_factors``, so that DoRA's
    magnitude renormalization after truncation is counted, not only the lost singular values of B A)."""
    exact = model.lora_factors(task)
    factors, _ = truncate_factors(exact, rank)
    module_errors: dict[str, float] = {}
    with torch.no_grad():
        for name, (a, b) in exact.items():
            delta_of = model.adapter_layers[name].delta_from_factors  # a LinearAdapter (MTModel.lora_factors)
            true = delta_of(a.double(), b.double()).double()
            approx = delta_of(*(f.double() for f in factors[name])).double()
            norm = float(torch.linalg.norm(true))
            module_errors[name] = float(torch.linalg.norm(approx - true)) / norm if norm > 0 else 0.0
    worst = max(module_errors.values(), default=0.0)
    return factors, {"exact": False, "rank": rank, "relative_error": worst, "module_errors": module_errors}


def approximate_factors(model: nn.Module, task: int | str | None, rank: int,
                        calibration: Iterable[dict[str, Any]] | None, *, ridge: float = 1e-6,
                        modules_per_pass: int | None = None) -> tuple[Factors, dict[str, Any]]:
    """Rank-``rank`` plain-LoRA factors approximating ``task``'s update, and a report of the error.

    ``calibration``: batches (dicts with input_ids, attention_mask, task_ids; labels are ignored); only the
    rows of ``task`` are used when it is given. Returns ``({module_name: (A (k x d_in), B (d_out x k))},
    report)``; the report has the overall and per-module relative output errors on the calibration tokens
    (``relative_error``, ``module_errors``), the SVD truncation errors of the weight updates, the token count
    and the mean routing weights. ``ridge`` is the relative ridge of the block least-squares fits;
    ``modules_per_pass`` bounds how many modules collect statistics at once (block fits hold a dim(h)^2 matrix
    each), at the price of more passes over the calibration data.
    """
    if model.merge_kind != "none":  # exact per-task / global factors exist: use them, truncated
        return _truncated_exact_factors(model, task, rank)
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    tokens = _Tokens()
    probes: list[_Probe] = []
    for name, layer in model.adapter_layers.items():
        kind = _export_kind(layer)
        if kind == "routed":
            probes.append(_ComponentProbe(name, layer, tokens))
        elif kind == "block":
            layer.output_linear()  # fails early, with the reason, for blocks without a single output linear
            probes.append(_BlockProbe(name, layer, tokens, ridge=ridge))
    if not probes:
        raise MergeError(model.method.merge_error or (
            f"method {model.method.name!r} has no adapter layer with a linear approximation to export"))
    batches = list(calibration) if calibration is not None else []
    if not batches:
        raise MergeError(f"method {model.method.name!r} is input-routed: exporting a plain LoRA needs "
                         f"calibration batches (calibration=[{{'input_ids', 'attention_mask', 'task_ids'}}, "
                         f"...]) to estimate the routing statistics and measure the error")
    tid = None if task is None else model.task_index(task)
    was_training = model.training
    model.eval()
    step = modules_per_pass or len(probes)
    tokens_seen = 0
    try:
        for start in range(0, len(probes), step):
            chunk = probes[start:start + step]
            for stage in ("stats", "error"):
                try:
                    for p in chunk:
                        if stage == "error":
                            p.finalize(rank)
                        getattr(p, f"attach_{stage}")()
                    tokens_seen = _run(model, batches, tid, tokens)
                finally:
                    for p in chunk:
                        p.remove()
                if tokens_seen == 0:
                    raise ValueError(f"the calibration batches have no (non-padding) rows for task "
                                     f"{model.tasks[tid] if tid is not None else None!r}")
    finally:
        model.train(was_training)
    factors: Factors = {}
    module_errors: dict[str, float] = {}
    err2 = ref2 = 0.0
    for p in probes:
        a, b = p.factors
        factors[p.export_name] = (a.float(), b.float())
        module_errors[p.export_name] = math.sqrt(p.err2 / p.ref2) if p.ref2 > 0 else 0.0
        err2 += p.err2
        ref2 += p.ref2
    report: dict[str, Any] = {
        "exact": False,
        "rank": rank,
        "relative_error": math.sqrt(err2 / ref2) if ref2 > 0 else 0.0,
        "module_errors": module_errors,
        "truncation_errors": {p.export_name: p.truncation_error for p in probes},
        "module_kinds": {p.export_name: p.kind for p in probes},
        "mean_routing": {p.export_name: p.mean_routing.tolist() for p in probes
                         if isinstance(p, _ComponentProbe)},
        "calibration_tokens": tokens_seen,
        "calibration_batches": len(batches),
        "ridge": ridge,
    }
    return factors, report
