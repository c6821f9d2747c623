"""Training and mixed-task inference throughput: HF PEFT and mtpeft side by side, in one process.

Same model (random weights in a real architecture's shape), batch, sequence length and rank for every row.
Prints a table and writes JSON + Markdown with tokens/s, peak memory, the ratios to PEFT and to the frozen-base
floor (the base model without adapters, forward and backward to the activations only: what any adapter method
costs at least), and whether each row meets its speed goal.

    python benchmarks/throughput.py --device cuda --compile --out benchmarks/results/throughput-h100
    python benchmarks/throughput.py --device cpu --out benchmarks/results/throughput-cpu
    python benchmarks/throughput.py --smoke        # a seconds-long correctness run (what CI does)

Besides the full-label rows (every position carries a label, as in pre-training), LoRA is also timed on
prompt-masked supervised fine-tuning batches (``--label-fraction``, default 0.5: the first half of every
sequence is prompt with label -100), the same masked labels for PEFT and mtpeft, in a table of its own.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import mtpeft  # noqa: E402

FLOOR = "base_floor"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_config(shape: str):
    import transformers as tf

    if shape == "qwen2.5-0.5b":
        return tf.Qwen2ForCausalLM, tf.Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                                  num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                                  max_position_embeddings=4096, tie_word_embeddings=True)
    if shape == "tiny-llama":
        return tf.LlamaForCausalLM, tf.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                                  num_attention_heads=8, num_key_value_heads=4, vocab_size=8192,
                                                  max_position_embeddings=1024)
    if shape == "smoke":
        return tf.LlamaForCausalLM, tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                                  max_position_embeddings=128)
    raise SystemExit(f"unknown shape {shape!r}; choose qwen2.5-0.5b, tiny-llama or smoke")


def base_model(args):
    cls, cfg = model_config(args.shape)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = cls(cfg).to(args.device, args.dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def tensor_gib(model) -> float:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**30


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_rows(rows: list[dict], args) -> None:
    """Time every row's step interleaved: first each row's warm-up (where a compiled row compiles, and a GPU row's
    peak memory is taken: its own weights plus the peak of what its steps allocate over the resident models), then
    ``--repeats`` rounds of ``--steps`` steps of every row in turn. A row's step time is its median over the
    rounds, so a change in machine load (a shared CPU) moves every row alike rather than the rows run then."""
    gpu = args.device == "cuda"
    for row in rows:
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        for _ in range(args.warmup):
            row["_step"]()
        sync(args.device)
        if gpu:
            row["peak_mem_gib"] = row["_weights_gib"] + (torch.cuda.max_memory_allocated() - before) / 2**30
    seconds: list[list[float]] = [[] for _ in rows]
    for _ in range(args.repeats):
        for row, times in zip(rows, seconds):
            sync(args.device)
            start = time.perf_counter()
            for _ in range(args.steps):
                row["_step"]()
            sync(args.device)
            times.append((time.perf_counter() - start) / args.steps)
    for row, times in zip(rows, seconds):
        dt = statistics.median(times)
        del row["_step"], row["_weights_gib"]
        row.update({"tokens_per_s": row.pop("_tokens") / dt, "step_ms": dt * 1e3,
                    "step_ms_rounds": [t * 1e3 for t in times]})
        print(json.dumps(row), flush=True)


def batch_labels(x: torch.Tensor, label_fraction: float) -> torch.Tensor:
    """Labels for ``x``: all positions, or a masked prompt (-100) followed by ``label_fraction`` of the positions."""
    labels = x.clone()
    labels[:, :x.shape[1] - round(x.shape[1] * label_fraction)] = -100
    return labels


def train_row(label: str, model, args, task_ids=None, label_fraction: float = 1.0) -> dict:
    """tokens/s and peak memory of forward+backward+AdamW on one fixed batch (tokens/s counts every input
    token, labelled or not); a model without trainable parameters gets no optimizer step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=args.device == "cuda") if params else None
    torch.manual_seed(1)
    x = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=args.device)
    labels = batch_labels(x, label_fraction)
    kwargs = {} if task_ids is None else {"task_ids": task_ids}

    def step():
        out = model(input_ids=x, labels=labels, **kwargs)
        out.loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    row = {"kind": "train" if label_fraction == 1 else "train_masked", "label": label,
           "trainable": sum(p.numel() for p in params), "_step": step, "_tokens": args.batch * args.seq,
           "_weights_gib": tensor_gib(model)}
    if label_fraction != 1:
        row["label_fraction"] = label_fraction
    return row


class FrozenFloor(torch.nn.Module):
    """The base model without adapters, in eager mode, with the mtpeft rows' loss head (the label-only chunked
    loss; the model's own with ``--loss-chunk 0``). The input embeddings' output requires grad, so backward runs
    through every frozen layer to the activations, as under an adapter, but computes no weight gradient."""

    def __init__(self, model, loss_chunk: int):
        super().__init__()
        self.model, self.loss_chunk = model, loss_chunk
        self.config = model.config
        model.get_input_embeddings().register_forward_hook(lambda module, inputs, out: out.requires_grad_())

    def forward(self, input_ids, labels):
        from mtpeft.core.loss import can_chunk_loss, chunked_causal_lm_loss

        if self.loss_chunk and can_chunk_loss(self.model):
            return chunked_causal_lm_loss(self.model, input_ids, None, labels, self.loss_chunk)
        return self.model(input_ids=input_ids, labels=labels)


def task_ids_for(args, num_tasks: int):
    return torch.arange(args.batch, device=args.device) % num_tasks


def mt_model(args, method: str, tasks: int = 8, **extra):
    cfg = {"method": method, "tasks": [f"t{i}" for i in range(tasks)], "r": args.rank, "alpha": 2 * args.rank,
           "target_modules": PROJECTIONS, **extra}
    model = mtpeft.get_mt_model(base_model(args), cfg)
    model.loss_chunk_size = args.loss_chunk
    return model


def lora_rows(args, label_fraction: float = 1.0) -> list[dict]:
    """The frozen-base floor, PEFT LoRA and mtpeft LoRA (eager, compiled) on the same batch and labels."""
    from peft import LoraConfig, get_peft_model

    suffix = "" if label_fraction == 1 else "_masked"
    rows = [train_row(f"{FLOOR}{suffix}", FrozenFloor(base_model(args), args.loss_chunk), args,
                      label_fraction=label_fraction)]
    if not args.skip_peft:
        peft_model = get_peft_model(base_model(args), LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                                 target_modules=PROJECTIONS, lora_dropout=0.0))
        rows.append(train_row(f"peft_lora{suffix}", peft_model, args, label_fraction=label_fraction))
    eager = mt_model(args, "lora", tasks=1)
    rows.append(train_row(f"mtpeft_lora{suffix}", eager, args, label_fraction=label_fraction))
    if args.compile:
        compiled = mt_model(args, "lora", tasks=1).compile()
        rows.append(train_row(f"mtpeft_lora_compiled{suffix}", compiled, args, label_fraction=label_fraction))
    return rows


def training_rows(args) -> list[dict]:
    rows = lora_rows(args)
    if 0 < args.label_fraction < 1:
        rows += lora_rows(args, args.label_fraction)
    suffix = "_compiled" if args.compile else ""
    # every method at its own defaults but for the shared rank, alpha and targets: what a user runs (mtLoRA's
    # default block adapters ignore target_modules)
    for method in ("align_lora", "thanora", "mtl_lora", "hydralora", "moe_lora", "mtlora"):
        if args.methods and method not in args.methods:
            continue
        model = mt_model(args, method)
        if args.compile:
            model.compile()
        model.train()
        # Align-LoRA's loss compares tasks pairwise from each task's statistics: with one sample per task it is
        # 0 (and cheap), so its row gets two samples per task
        tasks = max(1, min(8, args.batch // 2)) if method == "align_lora" else 8
        rows.append(train_row(f"mtpeft_{method}{suffix}", model, args, task_ids=task_ids_for(args, tasks)))
    return rows


def inference_rows(args) -> list[dict]:
    """Mixed-task forward: every row uses its own task's adapter (4 tasks)."""
    from peft import LoraConfig, get_peft_model

    rows = []
    x = torch.randint(0, model_config(args.shape)[1].vocab_size, (args.batch, args.infer_seq), device=args.device)
    tasks = 4
    names = [f"t{i % tasks}" for i in range(args.batch)]
    tid = task_ids_for(args, tasks)

    def measure(label, model, fn):
        def step():
            with torch.no_grad():
                fn()

        rows.append({"kind": "inference", "label": label, "_step": step, "_tokens": args.batch * args.infer_seq,
                     "_weights_gib": tensor_gib(model)})

    base = base_model(args).eval()
    measure("merged_or_base", base, lambda: base(input_ids=x))
    if not args.skip_peft:
        lc = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=PROJECTIONS, init_lora_weights=False)
        peft_model = get_peft_model(copy.deepcopy(base), lc, adapter_name="t0")
        for i in range(1, tasks):
            peft_model.add_adapter(f"t{i}", lc)
        peft_model.eval()
        measure("peft_adapter_names_mixed", peft_model, lambda: peft_model(input_ids=x, adapter_names=names))
    for method in ("mtl_lora", "moe_lora"):
        model = mtpeft.get_mt_model(copy.deepcopy(base), {"method": method, "tasks": [f"t{i}" for i in range(tasks)],
                                                          "r": args.rank, "target_modules": PROJECTIONS}).eval()
        if args.compile:
            model.compile()
        measure(f"mtpeft_{method}_mixed{'_compiled' if args.compile else ''}", model,
                lambda m=model: m(input_ids=x, task_ids=tid))
    return rows


GOAL_FLOOR, GOAL_LORA = 0.95, 0.85  # mtpeft LoRA (compiled) against the floor; each multi-task method against it


def references(kind: str) -> tuple[str, str, tuple[str, ...]]:
    """Labels of a table's floor, PEFT and mtpeft LoRA rows (compiled first, where both were measured)."""
    if kind == "inference":
        return "merged_or_base", "peft_adapter_names_mixed", ()
    suffix = "_masked" if kind == "train_masked" else ""
    return f"{FLOOR}{suffix}", f"peft_lora{suffix}", (f"mtpeft_lora_compiled{suffix}", f"mtpeft_lora{suffix}")


def add_ratios(rows: list[dict]) -> None:
    """Give each row its tokens/s over its table's floor, PEFT and mtpeft LoRA rows (``x_floor``, ``x_peft``,
    ``x_mtpeft_lora``) and its peak memory over PEFT's (``x_peft_memory``), where those rows were measured; with
    the ratio of every round (``x_floor_rounds``, ...: paired, the two rows ran in the same round)."""
    for kind in {r["kind"] for r in rows}:
        by = {r["label"]: r for r in rows if r["kind"] == kind}
        floor, peft, loras = references(kind)
        lora = next((by[label] for label in loras if label in by), None)
        for r in by.values():
            for key, ref in (("x_floor", by.get(floor)), ("x_peft", by.get(peft)), ("x_mtpeft_lora", lora)):
                if ref is not None:
                    r[key] = r["tokens_per_s"] / ref["tokens_per_s"]
                    if len(r.get("step_ms_rounds", ())) > 1 and len(ref.get("step_ms_rounds", ())) > 1:
                        r[f"{key}_rounds"] = [a / b for a, b in zip(ref["step_ms_rounds"], r["step_ms_rounds"])]
            if peft in by and "peak_mem_gib" in r and "peak_mem_gib" in by[peft]:
                r["x_peft_memory"] = r["peak_mem_gib"] / by[peft]["peak_mem_gib"]


def goals(rows: list[dict]) -> list[dict]:
    """One entry per row that has a speed goal (rows carry their ratios: :func:`add_ratios`): mtpeft LoRA
    >= GOAL_FLOOR x the floor (set for the compiled row), each multi-task method >= GOAL_LORA x mtpeft LoRA."""
    out = []

    def add(row, ratio, target, against, note="", rounds=()):
        met = ratio >= target
        spread = f", rounds {min(rounds):.2f}-{max(rounds):.2f}" if rounds else ""
        out.append({"row": row, "ratio": ratio, "target": target, "against": against, "met": met,
                    "text": f"{row}: {ratio:.3f}x {against}{spread} (goal >= {target}){note}: "
                            f"{'met' if met else 'NOT met'}"})

    for kind in ("train", "train_masked"):
        by = {r["label"]: r for r in rows if r["kind"] == kind}
        floor, _, loras = references(kind)
        lora = next((label for label in loras if label in by), None)
        if lora is not None and "x_floor" in by[lora]:
            add(lora, by[lora]["x_floor"], GOAL_FLOOR, floor,
                "" if "compiled" in lora else " [eager; the goal is for the compiled row: --compile]",
                by[lora].get("x_floor_rounds", ()))
        for label, r in by.items():
            if label.startswith("mtpeft_") and not label.startswith("mtpeft_lora") and "x_mtpeft_lora" in r:
                add(label, r["x_mtpeft_lora"], GOAL_LORA, lora, rounds=r.get("x_mtpeft_lora_rounds", ()))
    return out


def round_range(ratios) -> str:
    """' (lowest-highest)' of a row's paired per-round ratios; nothing for one round or a row against itself."""
    return f" ({min(ratios):.2f}-{max(ratios):.2f})" if ratios and min(ratios) != max(ratios) else ""


def markdown(rows: list[dict], meta: dict, goal_rows: list[dict]) -> str:
    lines = [f"# Throughput: {meta['shape']} on {meta['device_name']}", "",
             f"Command: `{meta['command']}`", "",
             f"torch {meta['torch']}, transformers {meta['transformers']}, peft {meta['peft']}, mtpeft "
             f"{meta['mtpeft']}; dtype {meta['dtype']}, batch {meta['batch']} x seq {meta['seq']} (inference seq "
             f"{meta['infer_seq']}), rank {meta['rank']} on all seven projections, {meta['repeats']} rounds of "
             f"{meta['steps']} timed steps per row, the rows interleaved in each round (median over rounds), after "
             f"{meta['warmup']} warm-up steps per row.", "",
             f"`{FLOOR}` is the frozen-base floor: the base model without adapters, eager, forward and backward to "
             "the activations (the input embeddings' output requires grad; no weight gradients, no optimizer), "
             "with the mtpeft rows' loss head. `x floor` is each row's tokens/s over it (inference: over the "
             "plain base model's forward, `merged_or_base`). A ratio's parentheses give the lowest and highest of its "
             "rounds' ratios (paired: both rows ran in the same round).", ""]
    fraction = next((r["label_fraction"] for r in rows if "label_fraction" in r), None)
    sections = [("train", "train", ""),
                ("train_masked", f"train, prompt-masked SFT (labels on the last {round(100 * (fraction or 0))}% "
                 "of positions)",
                 "Every row gets the same labels; PEFT computes logits at every position (the model's own "
                 "loss), mtpeft's label-only loss head at labelled positions only. tokens/s counts all input "
                 "tokens."),
                ("inference", "inference", "")]
    for kind, title, note in sections:
        sel = [r for r in rows if r["kind"] == kind]
        if not sel:
            continue
        lines += [f"## {title}", ""] + ([note, ""] if note else [])
        lines += ["| row | tokens/s | x floor | x PEFT | x mtpeft LoRA | peak GiB | x PEFT memory |",
                  "|---|---|---|---|---|---|---|"]
        for r in sel:
            cells = [f"{r[k]:.2f}{round_range(r.get(k + '_rounds', ()))}" if k in r else "-"
                     for k in ("x_floor", "x_peft", "x_mtpeft_lora", "peak_mem_gib", "x_peft_memory")]
            lines.append(f"| {r['label']} | {r['tokens_per_s']:,.0f} | {' | '.join(cells)} |")
        lines.append("")
    if goal_rows:
        lines += ["## goals", ""] + [f"- {g['text']}" for g in goal_rows] + [""]
    lines += ["Multi-task rows: 8 tasks, one per sample (Align-LoRA: two samples per task, since its loss "
              "compares tasks pairwise and is 0 with one sample per task); every method at its defaults but for "
              "the rank, alpha and targets (mtLoRA: its default block adapters around each MLP, which ignore "
              "the targets).", ""]
    if meta["device"] == "cpu":
        lines.append("No peak memory on the CPU: every row's model is resident at once, and the CPU allocator "
                     "keeps no per-row statistics.")
        lines += ["", "CPU timings depend on the allocator: glibc malloc serves each block over 32 MiB "
                  "(batch x seq x vocab fp32 logits: PEFT here) by a fresh mmap whose pages fault on first touch, "
                  f"every step. Allocator environment of this run: {meta.get('allocator_env') or 'the defaults'}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default=None, help="qwen2.5-0.5b (GPU default), tiny-llama (CPU default), smoke")
    parser.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU default)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--infer-seq", type=int, default=None)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row and round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds over all rows (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--loss-chunk", type=int, default=4096, help="label-only chunked loss (0: model's loss)")
    parser.add_argument("--label-fraction", type=float, default=0.5,
                        help="also time LoRA on prompt-masked batches with labels on this last fraction of the "
                             "positions (1: full-label rows only)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile the mtpeft rows")
    parser.add_argument("--methods", default="", help="comma-separated subset of the multi-task methods")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--no-inference", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 1 step: a correctness run")
    parser.add_argument("--out", default=None, help="folder for results.json and results.md")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    if args.smoke:
        args.shape, args.batch, args.seq, args.infer_seq, args.steps, args.warmup = "smoke", 4, 16, 16, 1, 1
        args.repeats = 1
    args.shape = args.shape or ("qwen2.5-0.5b" if gpu else "tiny-llama")
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    args.batch = args.batch or (16 if gpu else 8)
    args.seq = args.seq or (1024 if gpu else 128)
    args.infer_seq = args.infer_seq or (512 if gpu else 128)
    args.methods = [m for m in args.methods.split(",") if m]
    if not gpu:
        torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.compile:
        # dynamo keeps its compiled graphs per code object (the decoder's forward, shared by every model here),
        # at most 8 by default: past that a compiled row would silently run eager
        torch._dynamo.config.recompile_limit = 64
    import peft
    import transformers

    meta = {"shape": args.shape, "device": args.device,
            "device_name": torch.cuda.get_device_name() if gpu else f"CPU ({platform.processor() or 'x86_64'}, "
                                                                  f"{torch.get_num_threads()} threads)",
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "mtpeft": mtpeft.__version__, "dtype": str(args.dtype).replace("torch.", ""), "batch": args.batch,
            "seq": args.seq, "infer_seq": args.infer_seq, "rank": args.rank, "steps": args.steps,
            "repeats": args.repeats, "warmup": args.warmup,
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "allocator_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"}}
    print(json.dumps(meta), flush=True)
    rows = training_rows(args)
    if not args.no_inference:
        rows += inference_rows(args)
    time_rows(rows, args)
    add_ratios(rows)
    goal_rows = goals(rows)
    text = markdown(rows, meta, goal_rows)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "goals": goal_rows}, indent=2))
        (out / "results.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
