"""GPT-2-family models: transformers' Conv1D projections (c_attn, c_proj, c_fc) are linears to adapt, merge and
export (PEFT's fan_in_fan_out)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import perturb_adapters, tiny_batch

import mtpeft
from mtpeft.registry import config_from_dict

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                           eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return tf.GPT2LMHeadModel(config).eval()


def logits(model, ids, mask, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def test_conv1d_projections_are_targets_and_merge_exactly():
    from transformers.pytorch_utils import Conv1D

    base = tiny_gpt2()
    ids, mask, _ = tiny_batch()
    reference = logits(base, ids, mask)
    model = mtpeft.get_mt_model(copy.deepcopy(base), mtpeft.LoRAConfig(r=4, alpha=8, target_modules=GPT2_TARGETS))
    assert len(model.adapter_layers) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per layer
    torch.testing.assert_close(logits(model, ids, mask), reference)  # B = 0: the base model
    perturb_adapters(model)
    adapted = logits(model, ids, mask)
    assert (adapted - reference).abs().max() > 1e-2
    merged = model.merge_and_unload()
    assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D)  # the merged model is a plain GPT-2 again
    torch.testing.assert_close(logits(merged, ids, mask), adapted, atol=1e-5, rtol=1e-5)


def test_all_linear_on_gpt2_skips_the_tied_head():
    model = mtpeft.get_mt_model(tiny_gpt2(), mtpeft.LoRAConfig(r=2))
    assert {n.rsplit(".", 1)[-1] for n in model.adapter_layers} == {"c_attn", "c_proj", "c_fc"}


def test_conv1d_lora_equals_peft_and_the_export_loads_in_peft(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = tiny_gpt2()
    ids, mask, labels = tiny_batch()
    ours = mtpeft.get_mt_model(copy.deepcopy(base), mtpeft.LoRAConfig(r=4, alpha=8, target_modules=GPT2_TARGETS))
    perturb_adapters(ours)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=GPT2_TARGETS,
                                                                 fan_in_fan_out=True))
    with torch.no_grad():
        for name, layer in ours.adapter_layers.items():
            peft_layer = peft_model.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    expected = logits(ours, ids, mask)
    torch.testing.assert_close(logits(peft_model, ids, mask), expected, atol=1e-5, rtol=1e-5)

    report = ours.export_peft(tmp_path / "export")
    assert report["exact"]
    config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "export"))
    torch.testing.assert_close(logits(loaded, ids, mask), expected, atol=1e-5, rtol=1e-5)


PER_LINEAR = [
    ("lora", {}),
    ("align_lora", {"tasks": ["a", "b"]}),
    ("mtl_lora", {"tasks": ["a", "b"]}),
    ("moe_lora", {"tasks": ["a", "b"], "num_experts": 2}),
    ("hydralora", {"num_experts": 2}),
    ("thanora", {"tasks": ["a", "b"]}),
]


@pytest.mark.parametrize(("method", "extra"), PER_LINEAR, ids=[m for m, _ in PER_LINEAR])
def test_every_per_linear_method_adapts_conv1d(method, extra):
    base = tiny_gpt2()
    ids, mask, labels = tiny_batch()
    cfg = config_from_dict({"method": method, "r": 4, "target_modules": GPT2_TARGETS, **extra})
    model = mtpeft.get_mt_model(copy.deepcopy(base), cfg)
    perturb_adapters(model)
    task_ids = torch.tensor([0, 1, 0, 1]) if cfg.tasks else None
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=task_ids)
    out.loss.backward()
    missing = [name for name, p in model.trainable_parameters() if p.grad is None]
    assert not missing
    model.eval()
    if model.merge_kind == "none":
        return
    task = 0 if model.merge_kind == "per_task" else None
    one_task = torch.zeros(ids.shape[0], dtype=torch.long) if cfg.tasks else None
    adapted = logits(model, ids, mask, task_ids=one_task)
    merged = model.merge_and_unload(task)
    torch.testing.assert_close(logits(merged, ids, mask), adapted, atol=1e-5, rtol=1e-5)
