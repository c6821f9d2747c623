"""QLoRA: adapters over a bitsandbytes 4-bit (and 8-bit) base, gradient checkpointing, merge into dequantized
weights. bitsandbytes runs 4-bit layers on the CPU too, so these run in CI; the GPU check skips without CUDA."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import toy_run_config

import mtpeft
from mtpeft.base_models import load_base_model

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'mtpeft[qlora]')")

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def small_llama_dir(tmp_path_factory):
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama-for-4bit")
    tf.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def _randomize_b(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_lambda" in name:
                p.normal_(0, 0.1)


@pytest.mark.parametrize("method", ["lora", "mtl_lora"])
def test_4bit_base_trains_only_adapters_and_merges_into_dequantized_weights(small_llama_dir, tmp_path, method):
    import transformers as tf

    base = load_base_model(str(small_llama_dir), quantization="4bit")
    assert isinstance(base.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    model = mtpeft.get_mt_model(base, {"method": method, "tasks": ["a", "b"], "r": 4, "target_modules": TARGETS})
    x = torch.randint(0, 128, (2, 8))
    ids = torch.tensor([0, 1])
    model.train()
    model(input_ids=x, labels=x, task_ids=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, _ in model.trainable_parameters()}
    assert with_grad and with_grad <= trainable
    assert not any("base_layer" in n or "embed" in n or "norm" in n for n in trainable)

    _randomize_b(model)
    model.eval()
    task = "a" if method == "mtl_lora" else None
    with torch.no_grad():
        unmerged = model(input_ids=x, task_ids=[task or "a"] * 2).logits
        merged = model.merge_and_unload(task)
        out = merged(input_ids=x).logits
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in merged.modules())
    assert not hasattr(merged.config, "quantization_config")
    torch.testing.assert_close(out, unmerged, atol=1e-4, rtol=1e-4)
    merged.save_pretrained(tmp_path / "merged")  # a plain full-precision model
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, out, atol=1e-6, rtol=1e-6)


def test_gradient_checkpointing_over_a_4bit_base_gives_the_same_gradients(small_llama_dir):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        model = mtpeft.get_mt_model(load_base_model(str(small_llama_dir), quantization="4bit"),
                                    {"method": "lora", "tasks": ["a"], "r": 4, "target_modules": TARGETS})
        _randomize_b(model)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        x = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
        model(input_ids=x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


def test_8bit_base_merges_within_int8_activation_rounding(small_llama_dir):
    model = mtpeft.get_mt_model(load_base_model(str(small_llama_dir), quantization="8bit"),
                                {"method": "lora", "tasks": ["a"], "r": 4, "target_modules": TARGETS})
    _randomize_b(model)
    model.eval()
    x = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        unmerged = model(input_ids=x).logits
        out = model.merge_and_unload()(input_ids=x).logits
    # LLM.int8 also rounds the activations; the merged model computes with the exact dequantized weights
    assert (out - unmerged).abs().max() <= 0.05 * unmerged.abs().max()


def test_a_run_config_trains_a_4bit_base_end_to_end(tmp_path, tiny_model_dir):
    from mtpeft.training.run_config import load_run_config
    from mtpeft.training.trainer import train

    cfg = toy_run_config(tmp_path, tiny_model_dir, steps=2, save_every=0)
    cfg["model"].update({"quantization": "4bit", "gradient_checkpointing": True})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = train(load_run_config(path), progress=False)
    assert result.steps == 2 and result.final_loss is not None and torch.isfinite(torch.tensor(result.final_loss))
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_unknown_quantization_is_a_config_error(tmp_path, tiny_model_dir):
    from mtpeft.training.run_config import RunConfigError, run_config_from_dict

    cfg = toy_run_config(tmp_path, tiny_model_dir)
    cfg["model"]["quantization"] = "3bit"
    with pytest.raises(RunConfigError, match="model.quantization"):
        run_config_from_dict(cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA on a GPU needs CUDA; none here")
def test_4bit_lora_on_gpu_matches_merged(small_llama_dir):
    base = load_base_model(str(small_llama_dir), quantization="4bit", dtype="bfloat16")
    model = mtpeft.get_mt_model(base, {"method": "lora", "tasks": ["a"], "r": 4, "target_modules": TARGETS})
    _randomize_b(model)
    model.eval()
    x = torch.randint(0, 128, (2, 8), device="cuda")
    with torch.no_grad():
        unmerged = model(input_ids=x).logits.float()
        out = model.merge_and_unload()(input_ids=x).logits.float()
    torch.testing.assert_close(out, unmerged, atol=3e-2, rtol=3e-2)  # bf16 compute
