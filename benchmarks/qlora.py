"""QLoRA vs LoRA on the same base: peak memory and training tokens/s, each variant in its own process.

    python benchmarks/qlora.py --model smollm2 --out benchmarks/results/qlora-cpu          # CPU
    python benchmarks/qlora.py --model smollm2 --device cuda --out benchmarks/results/qlora-h100

Each row trains LoRA (r=8 on all seven projections) for a few steps on one fixed batch and reports peak memory
(CUDA: max allocated; CPU: the process's peak RSS) and tokens/s. A row runs in a fresh process, so one row's
peak memory does not leak into the next.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {
    "lora_fp32": {"quantization": None, "dtype": "float32", "checkpointing": False},
    "lora_bf16": {"quantization": None, "dtype": "bfloat16", "checkpointing": False},
    "qlora_4bit": {"quantization": "4bit", "dtype": "float32", "checkpointing": False},
    "qlora_4bit_checkpointing": {"quantization": "4bit", "dtype": "float32", "checkpointing": True},
}


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_variant(args: argparse.Namespace) -> dict:
    import torch

    import mtpeft
    from mtpeft.base_models import load_base_model

    spec = VARIANTS[args.variant]
    dtype = spec["dtype"] if args.device == "cpu" or spec["quantization"] is None else "bfloat16"
    base = load_base_model(args.model, dtype=dtype, quantization=spec["quantization"],
                           device=None if spec["quantization"] else args.device)
    model = mtpeft.get_mt_model(base, {"method": "lora", "tasks": ["t"], "r": 8, "alpha": 16,
                                       "target_modules": PROJECTIONS})
    model.loss_chunk_size = 1024
    if spec["checkpointing"]:
        model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-4)
    x = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), device=model.device)
    weights_gib = base.get_memory_footprint() / 2**30
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:  # loading a 4-bit model passes through full-precision weights: measure training, not loading
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak-RSS high-water mark (Linux)

    def step() -> float:
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    for _ in range(args.warmup):
        step()
    if args.device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    if args.device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    peak = (torch.cuda.max_memory_allocated() if args.device == "cuda"
            else _peak_rss_bytes()) / 2**30
    return {"variant": args.variant, "tokens_per_s": args.batch * args.seq / dt, "step_ms": dt * 1e3,
            "peak_gib": peak, "base_weights_gib": weights_gib, "final_loss": losses[-1], "dtype": dtype,
            "quantization": spec["quantization"], "gradient_checkpointing": spec["checkpointing"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="base model name or path")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated subset of {list(VARIANTS)} (default: all; on CPU all but bf16, "
                             f"which has no fast CPU kernels)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    parser.add_argument("--out", help="folder for results.json and results.md")
    args = parser.parse_args(argv)
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return 0

    import torch

    rows = []
    names = args.variants.split(",") if args.variants else [
        v for v in VARIANTS if args.device == "cuda" or v != "lora_bf16"]
    for name in names:
        cmd = [sys.executable, __file__, "--variant", name, "--model", args.model, "--device", args.device,
               "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
               "--warmup", str(args.warmup)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[len("RESULT "):]))
        print(json.dumps(rows[-1]), flush=True)
    if not rows:
        return 1
    ref = rows[0]
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.machine()}, " \
        f"{torch.get_num_threads()} threads)"
    lines = [f"# QLoRA vs LoRA: {args.model} on {device}", "",
             f"Command: `python benchmarks/qlora.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             f"torch {torch.__version__}; batch {args.batch} x seq {args.seq}, LoRA r=8 on all seven projections, "
             f"{args.steps} timed steps after {args.warmup} warm-up, each variant in its own process.", "",
             "| variant | base | base weights GiB | tokens/s | x first row | training peak GiB | x first row |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['quantization'] or r['dtype']} | {r['base_weights_gib']:.3f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / ref['tokens_per_s']:.2f} | "
                     f"{r['peak_gib']:.2f} | {r['peak_gib'] / ref['peak_gib']:.2f} |")
    if args.device == "cpu":
        lines += ["", "CPU training peak is the process's peak RSS from after loading to the end of training "
                  "(weights, activations, allocator caches); loading is excluded."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))
        (out / "results.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
