"""``mtpeft analyze RUN_DIR``: the multi-task diagnostics of a finished run (writes RUN_DIR/analysis/)."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import UsageError
from .checks import check_remote_code
from .options import add_trust_remote_code_option


def add_parser(subparsers: Any) -> None:
    """Add the ``analyze`` subcommand."""
    p = subparsers.add_parser(
        "analyze",
        help="Multi-task diagnostics of a finished run (writes RUN_DIR/analysis/).",
        description="Gradient conflict between tasks per layer, spectral alignment of task updates, "
        "per-layer similarity of task representations, overlap between task subspaces (ThanoRA blocks), "
        "router usage/entropy and adapter-space task alignment (the MMD of z = A x between tasks), each as a "
        "Markdown table, JSON and a PNG plot.",
    )
    p.add_argument("run_dir", help="A run folder written by `mtpeft train` (or a bench run's run/ folder).")
    p.add_argument("--out", default=None, help="Output folder (default: RUN_DIR/analysis).")
    p.add_argument(
        "--diagnostics",
        default=None,
        help="Comma-separated subset of gradient_conflict, spectral_alignment, layer_similarity, "
        "subspace_overlap, router_usage, alignment (default: all).",
    )
    p.add_argument("--batches", type=int, default=2, help="Batches per task. (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="Examples per batch. (default: %(default)s)")
    p.add_argument(
        "--split",
        choices=["train", "eval"],
        default="train",
        help="Which examples to use. (default: %(default)s)",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=4,
        help="Singular directions (spectral alignment) and subspace dimension (subspace overlap). "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--max-layers",
        type=int,
        default=8,
        help="At most this many adapter layers get per-task d_out x d_in matrices (memory); 0 = all. "
        "(default: %(default)s)",
    )
    p.add_argument("--max-tasks", type=int, default=None, help="Only the first N tasks of the run.")
    p.add_argument("--device", default=None, help="Device (default: cuda if available, else cpu).")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's choice).")
    add_trust_remote_code_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Compute the multi-task diagnostics of a finished run."""
    from ..analysis import analyze_run

    check_remote_code(args.run_dir, args.trust_remote_code)
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    result = analyze_run(
        args.run_dir,
        args.out,
        diagnostics=args.diagnostics,
        num_batches=args.batches,
        batch_size=args.batch_size,
        top_k=args.top_k,
        max_layers=args.max_layers or None,
        split=args.split,
        device=args.device,
        max_tasks=args.max_tasks,
    )
    for d in result["diagnostics"]:
        state = "ok" if d.applicable else f"not applicable ({d.note})"
        print(f"  {d.name:20s} {state}")
    print(f"\nanalysis written to {result['out_dir']} (report.md, <diagnostic>.md/.json/.png)")
    return 0
