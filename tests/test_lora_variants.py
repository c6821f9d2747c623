"""DoRA and the PiSSA / OLoRA initializations of LoRA, against PEFT on the same weights: forward, gradients, merge,
save/load and the PEFT export."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import perturb_adapters, tiny_batch, tiny_model
from safetensors.torch import load_file
from test_conv1d import GPT2_TARGETS, tiny_gpt2

import mtpeft
from mtpeft.errors import ConfigError
from mtpeft.registry import config_from_dict

TARGETS = ["q_proj", "v_proj", "down_proj"]


def logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def peft_layers(peft_model) -> dict[str, torch.nn.Module]:
    return {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}


def copy_into_peft(ours, peft_model) -> None:
    layers = peft_layers(peft_model)
    assert set(layers) == set(ours.adapter_layers)
    with torch.no_grad():
        for name, layer in ours.adapter_layers.items():
            layers[name].lora_A["default"].weight.copy_(layer.lora_A)
            layers[name].lora_B["default"].weight.copy_(layer.lora_B)
            if layer.use_dora:
                layers[name].lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector)


def test_dora_equals_peft_logits_and_gradients():
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama")
    ours = mtpeft.get_mt_model(copy.deepcopy(base), mtpeft.LoRAConfig(r=4, alpha=8, target_modules=TARGETS,
                                                                        use_dora=True))
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                 use_dora=True))
    ids, mask, labels = tiny_batch()
    torch.testing.assert_close(logits(ours, ids, mask), logits(base, ids, mask), atol=1e-5, rtol=1e-5)
    layer = next(iter(ours.adapter_layers.values()))
    peft_magnitude = peft_layers(peft_model)[layer.module_name].lora_magnitude_vector["default"].weight
    torch.testing.assert_close(layer.lora_magnitude_vector, peft_magnitude)  # m starts at ||W0||_row
    perturb_adapters(ours, std=0.3)
    copy_into_peft(ours, peft_model)
    out_ours = ours(input_ids=ids, attention_mask=mask, labels=labels)
    out_peft = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out_ours.logits, out_peft.logits, atol=1e-5, rtol=1e-5)
    out_ours.loss.backward()
    out_peft.loss.backward()
    theirs = peft_layers(peft_model)
    for name, layer in ours.adapter_layers.items():
        for mine, peft_param in ((layer.lora_A, theirs[name].lora_A["default"].weight),
                                 (layer.lora_B, theirs[name].lora_B["default"].weight),
                                 (layer.lora_magnitude_vector, theirs[name].lora_magnitude_vector["default"].weight)):
            torch.testing.assert_close(mine.grad, peft_param.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dora_merges_exactly_and_exports_with_its_magnitude(tmp_path, arch):
    from peft import PeftModel

    base = tiny_gpt2() if arch == "gpt2" else tiny_model("llama")
    targets = GPT2_TARGETS if arch == "gpt2" else TARGETS
    ours = mtpeft.get_mt_model(copy.deepcopy(base), mtpeft.LoRAConfig(r=4, alpha=8, target_modules=targets,
                                                                        use_dora=True))
    perturb_adapters(ours, std=0.3)
    ids, mask, _ = tiny_batch()
    expected = logits(ours, ids, mask)
    assert (expected - logits(base, ids, mask)).abs().max() > 1e-2

    ours.export_peft(tmp_path / "export")
    config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    tensors = load_file(str(tmp_path / "export" / "adapter_model.safetensors"))
    first = next(iter(ours.adapter_layers))
    assert f"base_model.model.{first}.lora_magnitude_vector" in tensors
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "export"))
    torch.testing.assert_close(logits(loaded, ids, mask), expected, atol=1e-5, rtol=1e-5)

    ours.save_pretrained(tmp_path / "adapter")
    reloaded = mtpeft.MTModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded, ids, mask), expected, atol=1e-6, rtol=1e-6)

    merged = ours.merge_and_unload()
    torch.testing.assert_close(logits(merged, ids, mask), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_weight_inits_equal_peft_and_start_at_the_base_model(init):
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama")
    ours = mtpeft.get_mt_model(copy.deepcopy(base), mtpeft.LoRAConfig(r=4, alpha=8, target_modules=TARGETS,
                                                                        init_from_weights=init))
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                 init_lora_weights=init))
    ids, mask, labels = tiny_batch()
    torch.testing.assert_close(logits(ours, ids, mask), logits(base, ids, mask), atol=1e-5, rtol=1e-5)
    theirs = peft_layers(peft_model)
    for name, layer in ours.adapter_layers.items():  # the same factors as PEFT's initialization
        torch.testing.assert_close(layer.lora_A, theirs[name].lora_A["default"].weight, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.lora_B, theirs[name].lora_B["default"].weight, atol=1e-5, rtol=1e-5)
    perturb_adapters(ours, std=0.05)
    copy_into_peft(ours, peft_model)
    out_ours = ours(input_ids=ids, attention_mask=mask, labels=labels)
    out_peft = peft_model(input_ids=ids, attention_mask=mask, labels=labels)  # its base weight is the residual
    torch.testing.assert_close(out_ours.logits, out_peft.logits, atol=1e-4, rtol=1e-4)
    out_ours.loss.backward()
    out_peft.loss.backward()
    for name, layer in ours.adapter_layers.items():
        torch.testing.assert_close(layer.lora_B.grad, theirs[name].lora_B["default"].weight.grad,
                                   atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_weight_inits_save_merge_and_export_against_the_original_base(tmp_path, init):
    from peft import PeftModel

    base = tiny_model("llama")
    original = copy.deepcopy(base.state_dict())
    ours = mtpeft.get_mt_model(copy.deepcopy(base), mtpeft.LoRAConfig(r=4, alpha=8, target_modules=TARGETS,
                                                                        init_from_weights=init))
    perturb_adapters(ours, std=0.05)
    ids, mask, _ = tiny_batch()
    expected = logits(ours, ids, mask)
    assert (expected - logits(base, ids, mask)).abs().max() > 1e-3

    report = ours.export_peft(tmp_path / "export")  # PEFT's PiSSA-to-LoRA rule: rank 2r on the original base
    assert report["exact"] and report["r"] == 8
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "export"))
    torch.testing.assert_close(logits(loaded, ids, mask), expected, atol=1e-5, rtol=1e-5)

    ours.save_pretrained(tmp_path / "adapter")  # the adapter alone: the base weights stay as loaded
    reloaded = mtpeft.MTModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded, ids, mask), expected, atol=1e-5, rtol=1e-5)

    merged = ours.merge_and_unload()
    torch.testing.assert_close(logits(merged, ids, mask), expected, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(base.state_dict()[k], v) for k, v in original.items())


def test_variant_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"LoRAConfig.init_from_weights must be null or one of"):
        mtpeft.LoRAConfig(init_from_weights="svd")
    with pytest.raises(ConfigError, match=r"LoRAConfig.use_dora must be false with init_from_weights"):
        mtpeft.LoRAConfig(use_dora=True, init_from_weights="pissa")
    with pytest.raises(ConfigError, match=r"AlignLoRAConfig.use_dora must be false for methods other than 'lora'"):
        config_from_dict({"method": "align_lora", "tasks": ["a", "b"], "use_dora": True})


def test_align_lora_starts_from_pissa_and_merges_exactly():
    base = tiny_model("llama")
    cfg = config_from_dict({"method": "align_lora", "tasks": ["a", "b"], "r": 4, "target_modules": TARGETS,
                            "init_from_weights": "pissa"})
    model = mtpeft.get_mt_model(copy.deepcopy(base), cfg).eval()
    ids, mask, labels = tiny_batch()
    torch.testing.assert_close(logits(model, ids, mask), logits(base, ids, mask), atol=1e-5, rtol=1e-5)
    perturb_adapters(model, std=0.05)
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=torch.tensor([0, 1, 0, 1]))
    assert "align" in out.aux_losses
    model.eval()
    expected = logits(model, ids, mask)
    torch.testing.assert_close(logits(model.merge_and_unload(), ids, mask), expected, atol=1e-5, rtol=1e-5)


def test_dora_truncated_export_reports_the_error_peft_sees(tmp_path):
    """A rank-truncated DoRA export changes the row norms that the magnitude divides by, not only B A: the reported
    error is that of the weights PEFT builds from the export, per module."""
    from peft import PeftModel

    base = tiny_model("llama")
    ours = mtpeft.get_mt_model(copy.deepcopy(base), mtpeft.LoRAConfig(r=4, alpha=8, target_modules=TARGETS,
                                                                        use_dora=True))
    perturb_adapters(ours, std=0.3)
    report = ours.export_peft(tmp_path / "export", rank=2)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "export")).merge_and_unload()
    base_weights = dict(base.named_parameters())
    loaded_weights = dict(loaded.named_parameters())
    seen = {}
    for name, layer in ours.adapter_layers.items():
        with torch.no_grad():
            true = layer.delta_weight().double()
        exported = (loaded_weights[f"{name}.weight"] - base_weights[f"{name}.weight"]).detach().double()
        seen[name] = float(torch.linalg.norm(exported - true) / torch.linalg.norm(true))
        assert report["module_errors"][name] == pytest.approx(seen[name], rel=1e-3, abs=1e-6)
    assert report["relative_error"] == pytest.approx(max(seen.values()), rel=1e-3)
    assert report["relative_error"] > 0.01
