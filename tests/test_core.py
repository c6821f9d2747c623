"""Properties every method must have, checked numerically on tiny models of four architectures."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import ARCHS, TASKS, perturb_adapters, tiny_batch, tiny_model

import mtpeft
from mtpeft.registry import get_method

METHODS = mtpeft.available_methods()
MERGEABLE = [m for m in METHODS if get_method(m).merge != "none"]


def make(method: str, arch: str = "llama", **overrides):
    base = tiny_model(arch)
    cfg = mtpeft.config_from_dict({"method": method, "tasks": TASKS, "r": 4, **overrides})
    return base, mtpeft.get_mt_model(copy.deepcopy(base), cfg)


def logits(model, ids, mask, task_ids=None):
    kwargs = {} if task_ids is None else {"task_ids": task_ids}
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_initial_logits_equal_base(method, arch):
    base, model = make(method, arch)
    ids, mask, _ = tiny_batch()
    model.eval()
    expected = logits(base, ids, mask)
    got = logits(model, ids, mask, torch.tensor([0, 1, 2, 0]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", MERGEABLE)
def test_merge_matches_unmerged_per_task_and_in_mixed_batches(method, arch):
    _, model = make(method, arch)
    perturb_adapters(model)
    model.eval()
    ids, mask, _ = tiny_batch()
    mixed = torch.tensor([2, 0, 1, 2])
    mixed_logits = logits(model, ids, mask, mixed)
    for t, task in enumerate(TASKS):
        unmerged = logits(model, ids, mask, torch.full((4,), t))
        merged = copy.deepcopy(model).merge_and_unload(task=task)
        assert not any(isinstance(m, mtpeft.core.layers.LinearAdapter) for m in merged.modules())
        merged_logits = logits(merged, ids, mask)
        torch.testing.assert_close(merged_logits, unmerged, atol=1e-4, rtol=0)
        rows = mixed == t
        torch.testing.assert_close(mixed_logits[rows], merged_logits[rows], atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_perturbed_adapter_changes_output(method):
    """Guards the merge test: the update must be visible, so equal logits are not trivially equal."""
    base, model = make(method)
    perturb_adapters(model)
    model.eval()
    ids, mask, _ = tiny_batch()
    diff = (logits(model, ids, mask, torch.tensor([0, 1, 2, 0])) - logits(base, ids, mask)).abs().max()
    assert diff > 1e-3


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("method", MERGEABLE)
def test_export_peft_loads_in_peft_with_same_logits(method, arch, tmp_path):
    from peft import PeftModel

    base, model = make(method, arch)
    perturb_adapters(model)
    model.eval()
    ids, mask, _ = tiny_batch()
    task = "rte"
    expected = logits(model, ids, mask, torch.full((4,), TASKS.index(task)))
    report = model.export_peft(tmp_path / "peft", task=task)
    assert report["exact"] and report["relative_error"] == 0.0
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    assert cfg["r"] == report["r"] and cfg["lora_alpha"] == cfg["r"]
    assert cfg["target_modules"]
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(peft_model, ids, mask), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_save_and_load_round_trip_exactly(method, tmp_path):
    base, model = make(method)
    perturb_adapters(model)
    model.eval()
    ids, mask, _ = tiny_batch()
    tid = torch.tensor([0, 1, 2, 1])
    expected = logits(model, ids, mask, tid)
    model.save_pretrained(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_model.safetensors", "mtpeft_config.json"]
    loaded = mtpeft.MTModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    assert loaded.adapter_config == model.adapter_config
    for key, value in model.adapter_state_dict().items():
        assert torch.equal(loaded.adapter_state_dict()[key], value), key
    assert torch.equal(logits(loaded, ids, mask, tid), expected)


def test_loading_onto_another_base_names_module_and_shapes(tmp_path):
    _, model = make("lora")
    model.save_pretrained(tmp_path / "adapter")
    import transformers as tf

    other = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(mtpeft.AdapterLoadError, match="intermediate_size: adapter 48 vs base 64"):
        mtpeft.MTModel.from_pretrained(other, tmp_path / "adapter")
    with pytest.raises(mtpeft.AdapterLoadError, match=r"mlp\.(gate|up)_proj'? has shape \(4, 32\)|mlp\..*shape"):
        mtpeft.MTModel.from_pretrained(other, tmp_path / "adapter", strict_base=False)
    with pytest.raises(mtpeft.AdapterLoadError, match="different base model|another base model"):
        mtpeft.MTModel.from_pretrained(tiny_model("qwen2"), tmp_path / "adapter")


def test_pickle_adapters_are_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save({"x": torch.zeros(1)}, folder / "adapter_model.bin")
    with pytest.raises(mtpeft.AdapterLoadError, match="safetensors only"):
        mtpeft.MTModel.from_pretrained(tiny_model(), folder)


@pytest.mark.parametrize("method", METHODS)
def test_only_adapter_parameters_train_and_base_stays_bit_identical(method):
    _, model = make(method)
    base_before = {n: p.detach().clone() for n, p in model.base_model.named_parameters() if not p.requires_grad}
    model.train()
    opt = torch.optim.SGD([p for _, p in model.trainable_parameters()], lr=0.1)
    ids, mask, labels = tiny_batch()
    for _ in range(3):
        opt.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=torch.tensor([0, 1, 2, 0]))
        out.loss.backward()
        for name, p in model.named_parameters():
            if not p.requires_grad:
                assert p.grad is None, f"frozen parameter {name} got a gradient"
        opt.step()
    trainable = {n for n, _ in model.trainable_parameters()}
    assert trainable and all(".base_layer." not in n for n in trainable)
    for name, p in model.base_model.named_parameters():
        if name in base_before:
            assert torch.equal(p, base_before[name]), f"base weight {name} changed"


def test_task_ids_forms_and_errors():
    _, model = make("mtl_lora")
    ids, mask, _ = tiny_batch()
    model.eval()
    by_name = logits(model, ids, mask, ["cola", "sst2", "rte", "cola"])
    by_id = logits(model, ids, mask, torch.tensor([2, 0, 1, 2]))
    torch.testing.assert_close(by_name, by_id)
    with pytest.raises(ValueError, match=r"task id 3 is out of range.*\['sst2', 'rte', 'cola'\]"):
        logits(model, ids, mask, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match=r"unknown task 'mnli'.*\['sst2', 'rte', 'cola'\]"):
        logits(model, ids, mask, ["mnli"] * 4)
    with pytest.raises(ValueError, match=r"needs task_ids.*\['sst2', 'rte', 'cola'\]"):
        logits(model, ids, mask)
    with pytest.raises(ValueError, match="4 entries for a batch of 2|for a batch of 2"):
        logits(model, ids[:2], mask[:2], torch.tensor([0, 1, 2, 0]))


def test_task_agnostic_methods_need_no_task_ids_at_inference():
    for method in ("lora", "align_lora", "thanora"):
        base, model = make(method)
        model.eval()
        ids, mask, _ = tiny_batch()
        torch.testing.assert_close(logits(model, ids, mask), logits(base, ids, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", [m for m in METHODS if get_method(m).merge == "per_task"])
def test_per_task_merge_needs_a_task(method):
    _, model = make(method)
    with pytest.raises(mtpeft.MergeError, match="per task"):
        model.merge_and_unload()


def test_generate_with_per_row_task_ids_matches_merged_models():
    base, model = make("mtl_lora")
    perturb_adapters(model)
    model.eval()
    ids, mask, _ = tiny_batch(pad=False)
    tid = torch.tensor([0, 1, 2, 1])
    out = model.generate(input_ids=ids, attention_mask=mask, task_ids=tid, max_new_tokens=4, do_sample=False,
                         pad_token_id=0)
    for t in range(3):
        merged = copy.deepcopy(model).merge_and_unload(task=t)
        ref = merged.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        rows = tid == t
        assert torch.equal(out[rows], ref[rows])


def test_config_validation_errors_name_the_field():
    with pytest.raises(mtpeft.ConfigError, match=r"\.r must be a positive integer"):
        mtpeft.LoRAConfig(r=0)
    with pytest.raises(mtpeft.ConfigError, match="duplicate task names: \\['a'\\]"):
        mtpeft.ThanoRAConfig(tasks=["a", "b", "a"])
    with pytest.raises(mtpeft.ConfigError, match=r"tasks\[1\] is empty"):
        mtpeft.MTLLoRAConfig(tasks=["a", ""])
    with pytest.raises(mtpeft.ConfigError, match="needs the list of tasks"):
        mtpeft.MTLLoRAConfig(tasks=[])
    with pytest.raises(mtpeft.ConfigError, match="unknown key\\(s\\) \\['rank'\\]"):
        mtpeft.config_from_dict({"method": "lora", "rank": 8})
    with pytest.raises(mtpeft.ConfigError, match="unknown method 'nope'; available methods"):
        mtpeft.config_from_dict({"method": "nope"})
    cfg = mtpeft.config_from_dict({"method": "lora", "target_modules": ["q_proj", "nonexistent_proj"]})
    with pytest.raises(mtpeft.ConfigError, match=r"'nonexistent_proj' matches no linear.*'q_proj'"):
        mtpeft.get_mt_model(tiny_model(), cfg)


@pytest.mark.parametrize("method", METHODS)
def test_config_json_round_trip(method, tmp_path):
    cfg = mtpeft.config_from_dict({"method": method, "tasks": TASKS, "r": 6})
    cfg.to_json_file(tmp_path / "c.json")
    again = mtpeft.config_from_dict(json.loads((tmp_path / "c.json").read_text()))
    assert again == cfg and type(again) is type(cfg)
    assert all(text for text in type(cfg).help().values()), "every config field needs help text"


def test_each_method_lives_in_its_own_module():
    for name in METHODS:
        spec = get_method(name)
        assert spec.config_class.__module__ == f"mtpeft.methods.{name}"
