"""mtpeft LoRA against PEFT's LoRA given the same A and B: logits and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_batch, tiny_model

import mtpeft


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_lora_equals_peft_logits_and_gradients(arch, use_rslora):
    from peft import LoraConfig, get_peft_model

    base = tiny_model(arch)
    targets = ["q_proj", "v_proj", "down_proj"] if arch == "llama" else ["query", "value", "dense"]
    ours = mtpeft.get_mt_model(copy.deepcopy(base), mtpeft.LoRAConfig(r=4, alpha=8, target_modules=targets,
                                                                        use_rslora=use_rslora))
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                 use_rslora=use_rslora, lora_dropout=0.0))
    g = torch.Generator().manual_seed(3)
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
                   if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    assert set(peft_layers) == set(ours.adapter_layers)
    with torch.no_grad():
        for name, layer in ours.adapter_layers.items():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
            peft_layers[name].lora_A["default"].weight.copy_(layer.lora_A)
            peft_layers[name].lora_B["default"].weight.copy_(layer.lora_B)
    ids, mask, labels = tiny_batch()
    out_ours = ours(input_ids=ids, attention_mask=mask, labels=labels)
    out_peft = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out_ours.logits, out_peft.logits, atol=1e-5, rtol=1e-5)
    out_ours.loss.backward()
    out_peft.loss.backward()
    for name, layer in ours.adapter_layers.items():
        torch.testing.assert_close(layer.lora_A.grad, peft_layers[name].lora_A["default"].weight.grad,
                                   atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(layer.lora_B.grad, peft_layers[name].lora_B["default"].weight.grad,
                                   atol=1e-6, rtol=1e-4)


def test_gaussian_init_and_scaling():
    model = mtpeft.get_mt_model(tiny_model(), mtpeft.LoRAConfig(r=4, alpha=8, init="gaussian", use_rslora=True))
    layer = next(iter(model.adapter_layers.values()))
    assert layer.scale == pytest.approx(8 / 2)
    assert layer.lora_A.std().item() == pytest.approx(0.25, rel=0.3)
    assert torch.count_nonzero(layer.lora_B) == 0


def test_all_linear_skips_the_output_head():
    model = mtpeft.get_mt_model(tiny_model(), mtpeft.LoRAConfig(r=2))
    assert "lm_head" not in model.adapter_layers
    assert len(model.adapter_layers) == 2 * 7
