"""``mtpeft bench SUITE``: benchmark methods and baselines on a suite (same data, steps and evaluation)."""

from __future__ import annotations

import argparse
import json
import re
from datetime import date
from pathlib import Path
from typing import Any

SUITE_NAMES = ("bbh27", "bbh-scaling", "glue", "commonsense")
ALL_METHODS = (
    "lora,align_lora,thanora,mtlora,hydralora,mtl_lora,moe_lora,ta_lora,untrained,single_task_lora,peft_lora"
)


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help when X is a real value (not None, False or an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower() or not action.option_strings:
            return text
        if (
            action.default is None
            or action.default is False
            or action.default == []
            or (action.default == argparse.SUPPRESS)
        ):
            return text
        return text + " (default: %(default)s)"


def parse_count(text: str) -> int:
    """'2400000', '2.4M', '500k', '1e6' -> an int (for --param-budget)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a parameter count such as 2400000, 2.4M or 500k, got {text!r}")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()]
    value = int(round(float(m.group(1)) * scale))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"the parameter budget must be positive, got {text!r}")
    return value


def default_output(suite: str, quick: bool, name: str | None) -> Path:
    """``benchmarks/results/<suite>[-quick]-<name or today's date>``."""
    return Path("benchmarks") / "results" / f"{suite}{'-quick' if quick else ''}-{name or date.today().isoformat()}"


def run(args: argparse.Namespace) -> int:
    """Run (or resume) a benchmark suite and write its report."""
    import torch

    from ..bench.options import BenchOptions, validate_methods
    from ..bench.report import write_report
    from ..bench.runner import BenchRunner
    from ..bench.suite_file import is_suite_file, load_suite_file
    from ..bench.suites import apply_scaling_steps, get_suite

    if args.threads:
        torch.set_num_threads(args.threads)
    from_file = load_suite_file(args.suite, quick=args.quick) if is_suite_file(args.suite) else None
    suite_name = from_file.suite.name if from_file else args.suite
    out = Path(args.output) if args.output else default_output(suite_name, args.quick, args.name)
    if args.report_only:
        paths = write_report(out)
        print(f"report: {paths['markdown']}")
        return 0
    if from_file is not None:
        suite = from_file.suite
        if args.scaling_steps:
            suite = apply_scaling_steps(suite, args.scaling_steps)
    else:
        suite = get_suite(args.suite, quick=args.quick, scaling_steps=args.scaling_steps or "per_task")
    file_seeds = from_file.seeds if from_file and args.seeds is None else None
    count = args.seeds or (1 if args.quick else 3)
    seeds = file_seeds or list(range(args.first_seed, args.first_seed + count))
    methods = args.methods or (from_file.methods if from_file else None) or ALL_METHODS
    options = BenchOptions(
        methods=validate_methods(methods),
        seeds=seeds,
        param_budget=args.param_budget or (from_file.param_budget if from_file else None),
        steps=args.steps,
        overrides=list(args.set),
        single_task_steps=args.single_task_steps,
        unseen_policy=args.unseen_policy,
        top_layers=args.top_layers,
        model=args.model,
        data_root=args.data_root,
        scaling_steps=args.scaling_steps,
        progress=args.progress,
        fail_fast=args.fail_fast,
    )
    runner = BenchRunner(suite, options, out)
    if args.dry_run:
        print_plan(runner)
        return 0
    runner.run()
    paths = write_report(runner.out_dir)
    print(f"\nreport: {paths['markdown']}\nplots:  {', '.join(paths['plots'].values())}")
    for setting, ranked in json.loads(Path(paths["json"]).read_text()).get("ranking", {}).items():
        print(f"recommendation{'' if len(suite.settings) == 1 else f' ({setting})'}: {ranked['recommendation']}")
    return 0


def print_plan(runner: Any) -> None:
    """The planned runs of a :class:`~mtpeft.bench.runner.BenchRunner`: rank, alpha, trainable parameters, done or
    not (``--dry-run``)."""
    from ..bench.budget import count_trainable_parameters

    print(f"suite {runner.suite.name}{' (quick)' if runner.suite.quick else ''} -> {runner.out_dir}")
    for s in runner.suite.settings:
        print(
            f"  setting {s.name}: {len(s.tasks)} tasks, {s.steps} steps"
            + (f", unseen {s.unseen_names}" if s.unseen else "")
        )
    counted: dict[str, int] = {}
    for spec in runner.runs:
        state = "done" if spec.done else "todo"
        if spec.method == "untrained":
            print(f"  [{state}] {spec.key}")
            continue
        method = spec.config["method"]
        params = spec.planned_parameters
        if params is None:
            key = f"{spec.setting}/{spec.method}"
            if key not in counted:
                names = [t if isinstance(t, str) else t["name"] for t in spec.config["tasks"]]
                single = spec.method == "single_task_lora"
                per = count_trainable_parameters(spec.config["model"]["name"], method, names[:1] if single else names)
                counted[key] = per * len(names) if single else per
            params = counted[key]
        notes = [n for n in spec.notes if "budget" not in n]
        print(
            f"  [{state}] {spec.key} r={method.get('r')} alpha={method.get('alpha')}, "
            f"{params:,} trainable parameters" + (f"  ({'; '.join(notes)})" if notes else "")
        )


def add_parser(subparsers: Any) -> None:
    """Add the ``bench`` subcommand."""
    set_help = (
        "Override a key of every run config, e.g. --set train.lr=1e-4 --set data.max_eval_per_task=20; "
        "method.<key> applies to every method, methods.<method>.<key> to one method "
        "(e.g. --set methods.hydralora.num_experts=8). Repeatable."
    )
    p = subparsers.add_parser(
        "bench",
        help="Benchmark methods and baselines on a suite (same data, steps, evaluation).",
        description="Train and evaluate every method (plus the untrained model, single-task LoRA adapters and "
        "Hugging Face PEFT's LoRA) on a suite with the same data, steps and evaluation, over seeds; writes one "
        "result JSON per run and a report (Markdown tables, PNG plots). Re-running the same command skips "
        "finished runs.",
        formatter_class=_DefaultsFormatter,
    )
    p.add_argument(
        "suite",
        metavar="SUITE",
        help=f"Benchmark suite: one of {', '.join(SUITE_NAMES)}, or a suite file (YAML: task specs as in a run "
        "config plus steps, batch_size, lr, seeds, methods, budget; see examples/bench/local_suite.yaml).",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="Comma-separated methods and baselines (untrained, single_task_lora, peft_lora: Hugging Face PEFT's "
        "LoRA on the lora run's config, trained on the same batches); default: the suite file's methods, else "
        "all eight methods and the three baselines.",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="Number of training seeds per method (default: the suite file's seeds, else 1 with --quick, else 3).",
    )
    p.add_argument("--first-seed", type=int, default=0, help="The first seed (seeds are consecutive).")
    p.add_argument(
        "--param-budget",
        type=parse_count,
        default=None,
        metavar="N",
        help="Choose each method's rank so that its trainable parameters come closest to N (e.g. 2.4M); "
        "single-task LoRA shares N among its adapters. Default: every method at rank 8.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="The reduced CPU setting (SmolLM2-135M, short tasks, few steps, small eval caps, adapters "
        "on the top layers only).",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="Optimizer steps per run (bbh-scaling: of the largest setting). Default: the suite's.",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    p.add_argument(
        "--single-task-steps",
        choices=["split", "same"],
        default="split",
        help="single_task_lora: 'split' gives each task's adapter ceil(steps / T) steps (the same total "
        "steps as one multi-task run); 'same' gives each the full steps.",
    )
    p.add_argument(
        "--unseen-policy",
        choices=["auto", "first_task", "skip"],
        default="auto",
        help="Unseen tasks (commonsense): 'auto' = no task id where the method needs none (MoE-LoRA: its "
        "unknown-task gate), task id 0 / the first task's adapter otherwise; 'first_task' = task "
        "id 0 for every method; 'skip' = only methods that need no task id.",
    )
    p.add_argument(
        "--scaling-steps",
        choices=["per_task", "fixed"],
        default=None,
        help="bbh-scaling: 'per_task' scales the steps with the number of tasks (default), 'fixed' keeps "
        "the same steps for every setting.",
    )
    p.add_argument(
        "--top-layers",
        type=int,
        default=None,
        metavar="K",
        help="Adapt only the top K transformer layers (0 = all). Default: 4 with --quick, else all.",
    )
    p.add_argument("--model", default=None, help="Base model name or path (default: the suite's, SmolLM2-135M).")
    p.add_argument(
        "--data-root",
        default=None,
        help="Folder the suites' data files resolve against (default: $MTPEFT_DATA_ROOT).",
    )
    p.add_argument(
        "--name",
        default=None,
        help="Name of the results folder benchmarks/results/<suite>-<name> (default: today's date).",
    )
    p.add_argument("--output", default=None, help="Results folder (overrides --name).")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="Print the planned runs (ranks, planned parameters, finished or not) without running them.",
    )
    p.add_argument("--report-only", action="store_true", help="Only rebuild the report from finished runs.")
    p.add_argument(
        "--fail-fast",
        action="store_true",
        help="Stop at the first failed run (default: record it in error.json and go on).",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    p.add_argument("--progress", action="store_true", help="Show progress bars for training and evaluation.")
    p.set_defaults(func=run)
