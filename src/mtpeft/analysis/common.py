"""What every diagnostic shares: the :class:`Diagnostic` record (table, JSON, plot), per-task batches and the
plotting helpers."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..plotting import pyplot
from ..tables import markdown_table

BatchesByTask = dict[str, list[dict[str, torch.Tensor]]]


@dataclass
class Diagnostic:
    """One diagnostic's result.

    Attributes:
        name: file stem (``gradient_conflict``...).
        title: heading for the report.
        description: what is measured and how to read it (one paragraph).
        header, rows: the Markdown table.
        data: JSON-ready numbers (per layer, per task pair...).
        applicable: False when the method has nothing to measure (e.g. no router); ``note`` says why.
        note: extra remark (the source of the task matrices, skipped layers...).
        plot: draws the PNG into a matplotlib figure given a path (None: no plot).
    """

    name: str
    title: str
    description: str
    header: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    applicable: bool = True
    note: str = ""
    plot: Callable[[Path], None] | None = None

    def markdown(self) -> str:
        """The diagnostic as a Markdown section (heading, description, note, table)."""
        lines = [f"## {self.title}", "", self.description, ""]
        if self.note:
            lines += [f"_{self.note}_", ""]
        if not self.applicable:
            lines.append("Not applicable to this run.")
        elif self.rows:
            lines.append(markdown_table(self.header, self.rows))
        else:
            lines.append("(no rows)")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: name, title, applicable, note, header, rows, data."""
        return {
            "name": self.name,
            "title": self.title,
            "applicable": self.applicable,
            "note": self.note,
            "header": self.header,
            "rows": self.rows,
            "data": self.data,
        }

    def save(self, folder: str | Path) -> dict[str, str]:
        """Write ``<name>.md``, ``<name>.json`` and ``<name>.png`` (a placeholder when not applicable)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        md = folder / f"{self.name}.md"
        md.write_text(self.markdown(), encoding="utf-8")
        js = folder / f"{self.name}.json"
        js.write_text(
            json.dumps(self.to_dict(), indent=2, default=_json_default, allow_nan=True) + "\n",
            encoding="utf-8",
        )
        png = folder / f"{self.name}.png"
        if self.applicable and self.plot is not None:
            self.plot(png)
        else:
            placeholder_plot(png, self.title, self.note or "not applicable to this run")
        return {"markdown": str(md), "json": str(js), "png": str(png)}


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def placeholder_plot(path: Path, title: str, text: str) -> None:
    """A small PNG that says why there is no plot."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 2))
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    ax.text(0.5, 0.4, text, ha="center", va="center", wrap=True, fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def two_panel_figure() -> tuple[Any, Any]:
    """A wide figure with a main panel and a narrower one beside it (for a heatmap): ``(fig, axes)``."""
    return pyplot().subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2, 1]})


def heatmap(
    ax: Any, matrix: list[list[float]], labels: list[str], title: str, vmin: float = -1.0, vmax: float = 1.0
) -> None:
    """A task x task matrix as a heatmap with the task names on both axes and a colour bar."""
    im = ax.imshow(matrix, cmap="coolwarm", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(labels)))
    ax.set_yticks(range(len(labels)))
    size = 8 if len(labels) <= 10 else 5
    ax.set_xticklabels(labels, rotation=90, fontsize=size)
    ax.set_yticklabels(labels, fontsize=size)
    ax.set_title(title, fontsize=9)
    ax.figure.colorbar(im, ax=ax, fraction=0.046)


def save_figure(fig: Any, path: Path) -> None:
    """Lay out, write (PNG, 110 dpi) and close a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(fig)


def short_name(name: str) -> str:
    """A layer name without the usual ``model.`` / ``base_model.`` prefixes (for tables and plots)."""
    for prefix in ("base_model.model.", "model.model.", "model."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def adapter_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Each adapter layer's own parameters (not its wrapped base module's), by layer name."""
    out = {}
    for name, layer in model.adapter_layers.items():
        params = [(n, p) for n, p in layer.named_parameters() if not n.startswith("base_layer.")]
        if params:
            out[name] = params
    return out


def task_batches(
    tokenizer: Any,
    tasks: Sequence[tuple[Any, Sequence[Any]]],
    task_names: Sequence[str],
    *,
    batch_size: int = 8,
    num_batches: int = 2,
    max_length: int = 256,
    truncation: str = "left",
) -> BatchesByTask:
    """Collated batches (input_ids, attention_mask, labels, task_ids) per task from (spec, examples) pairs.

    Takes the first ``batch_size * num_batches`` examples of each task, in order.
    """
    from ..data.collator import MultiTaskCollator

    collator = MultiTaskCollator(tokenizer, list(task_names), max_length=max_length, truncation=truncation)
    out: BatchesByTask = {}
    for spec, examples in tasks:
        examples = list(examples)[: batch_size * num_batches]
        batches = [collator(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]
        if batches:
            out[spec.name] = batches
    return out


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def top_singular(m: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k singular triplets of ``m`` (rows x cols) in float64: ``U_k`` (rows x k), ``sigma_k`` (k,),
    ``V_k`` (cols x k), from the eigendecomposition of the smaller Gram matrix (much faster than a full SVD of
    a wide weight-shaped matrix; accurate for the leading directions). Directions with a singular value of
    (numerically) zero are dropped, so fewer than k may come back."""
    m = m.double()
    wide = m.shape[0] <= m.shape[1]
    a = m if wide else m.T
    evals, evecs = torch.linalg.eigh(a @ a.T)  # ascending
    k = max(0, min(k, a.shape[0]))
    sigma = evals.flip(0)[:k].clamp_min(0).sqrt()
    left = evecs.flip(1)[:, :k]
    top = float(sigma[0]) if sigma.numel() else 0.0
    keep = sigma > max(top * 1e-7, 1e-300)
    sigma, left = sigma[keep], left[:, keep]
    right = (a.T @ left) / sigma
    return (left, sigma, right) if wide else (right, sigma, left)


def pairs(n: int) -> list[tuple[int, int]]:
    """All index pairs i < j below n."""
    return [(i, j) for i in range(n) for j in range(i + 1, n)]
