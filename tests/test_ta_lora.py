"""TA-LoRA (reconstruction): zero-init gated prompt attention, fast/slow parameter groups, adding tasks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import TASKS, perturb_adapters, tiny_batch, tiny_model

import mtpeft
from mtpeft.methods.ta_lora import PromptAttention


def make(arch: str = "llama", **overrides):
    base = tiny_model(arch)
    cfg = {"method": "ta_lora", "tasks": TASKS, "r": 4, "prompt_length": 3, **overrides}
    return base, mtpeft.get_mt_model(copy.deepcopy(base), cfg)


def logits(model, ids, mask, task_ids=None):
    kwargs = {} if task_ids is None else {"task_ids": task_ids}
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_initial_logits_equal_base_exactly(arch):
    base, model = make(arch, prompt_layers=[1, 2])
    assert len(model.adapter_layers) == 2
    ids, mask, _ = tiny_batch()
    torch.testing.assert_close(logits(model, ids, mask, torch.tensor([0, 1, 2, 0])), logits(base, ids, mask),
                               atol=1e-5, rtol=0)


def test_default_prompt_layers_are_half_three_quarters_and_last():
    cfg = mtpeft.TALoRAConfig(tasks=["a"])
    assert cfg.resolved_layers(28) == [14, 21, 28]
    assert cfg.resolved_layers(32) == [16, 24, 32]
    assert cfg.resolved_layers(2) == [1, 2]
    with pytest.raises(mtpeft.ConfigError, match=r"prompt_layers \[5\] exceed the model's 2 layers"):
        make(prompt_layers=[1, 5])
    with pytest.raises(mtpeft.ConfigError, match=r"TALoRAConfig\.prompt_layers must be None or a non-empty"):
        mtpeft.TALoRAConfig(tasks=["a"], prompt_layers=[0])


def test_prompt_attention_matches_an_explicit_per_head_computation():
    """Qwen2 (q/k/v biases, 4 query heads sharing 2 kv heads): compare with loops over heads."""
    _, model = make("qwen2", prompt_layers=[2])
    perturb_adapters(model)
    wrapper: PromptAttention = next(iter(model.adapter_layers.values()))
    attn = wrapper.base_layer
    h = torch.randn(2, 5, 32)
    task_ids = torch.tensor([2, 0])
    model.context.task_ids = task_ids
    got = wrapper.prompt_attention(h)
    hd, heads, kv_heads = 8, 4, 2
    expected = torch.zeros(2, 5, 32)
    for b in range(2):
        t = int(task_ids[b])
        prompt = wrapper.prompt_shared + wrapper.scale * wrapper.prompt_slow @ wrapper.prompt_fast[t]
        q = h[b] @ attn.q_proj.weight.T + attn.q_proj.bias
        k = prompt @ attn.k_proj.weight.T + attn.k_proj.bias
        v = prompt @ attn.v_proj.weight.T + attn.v_proj.bias
        heads_out = []
        for head in range(heads):
            kv = head // (heads // kv_heads)
            qh = q[:, head * hd:(head + 1) * hd]
            kh, vh = k[:, kv * hd:(kv + 1) * hd], v[:, kv * hd:(kv + 1) * hd]
            probs = torch.softmax(qh @ kh.T / math.sqrt(hd), dim=-1)
            heads_out.append(math.tanh(float(wrapper.prompt_gate.detach()[head])) * probs @ vh)
        expected[b] = torch.cat(heads_out, -1) @ attn.o_proj.weight.T
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_forward_backward_mixed_batch_reaches_every_parameter_and_needs_task_ids():
    _, model = make()
    perturb_adapters(model)
    model.train()
    ids, mask, labels = tiny_batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=torch.tensor([0, 1, 2, 0]))
    out.loss.backward()
    for name, p in model.trainable_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="needs task_ids"):
        model(input_ids=ids, attention_mask=mask, labels=labels)


def test_param_groups_give_slow_weights_a_scaled_learning_rate():
    _, model = make()
    groups = {g["name"]: g for g in model.param_groups(lr=1e-3, weight_decay=0.01)}
    # prompt_lr_scale 5 by default: the prompt learning rate is 5e-3
    assert groups["fast"]["lr"] == pytest.approx(5e-3) and groups["gates"]["lr"] == pytest.approx(5e-3)
    assert groups["slow"]["lr"] == pytest.approx(5e-4)
    n_layers = len(model.adapter_layers)
    assert len(groups["fast"]["params"]) == n_layers * len(TASKS)
    assert len(groups["slow"]["params"]) == 2 * n_layers and len(groups["gates"]["params"]) == n_layers
    assert model.param_groups(lr=1.0, slow_lr_scale=0.5)[1]["lr"] == pytest.approx(2.5)
    model.adapter_config.prompt_lr_scale = 1.0
    assert [g["lr"] for g in model.param_groups(lr=1e-3)] == pytest.approx([1e-3, 1e-4, 1e-3])
    total = sum(p.numel() for g in groups.values() for p in g["params"])
    assert total == model.num_trainable_parameters()


def test_add_task_then_training_changes_only_the_new_fast_weights(tmp_path):
    base, model = make()
    perturb_adapters(model)
    ids, mask, labels = tiny_batch()
    model.eval()
    old_logits = {t: logits(model, ids, mask, t) for t in range(len(TASKS))}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tid = model.add_task("mnli", init="rte", train_only_new=True)
    assert tid == 3 and model.tasks == [*TASKS, "mnli"]
    wrapper = next(iter(model.adapter_layers.values()))
    assert torch.equal(wrapper.prompt_fast[3], wrapper.prompt_fast[1])
    new_names = {f"base_model.{name}.prompt_fast.3" for name in model.adapter_layers}
    assert {n for n, _ in model.trainable_parameters()} == new_names
    model.train()
    opt = torch.optim.AdamW(model.param_groups(lr=0.05, weight_decay=0.1))
    for _ in range(3):
        opt.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=torch.full((4,), tid))
        out.loss.backward()
        opt.step()
    for name, p in model.named_parameters():
        if name in new_names:
            assert not torch.equal(p, wrapper.prompt_fast[1]), name
        else:
            assert torch.equal(p, before[name]), f"{name} changed"
    model.eval()
    for t, expected in old_logits.items():
        assert torch.equal(logits(model, ids, mask, t), expected)
    assert (logits(model, ids, mask, tid) - old_logits[1]).abs().max() > 1e-4
    model.save_pretrained(tmp_path / "a")
    loaded = mtpeft.MTModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    assert loaded.tasks == model.tasks
    assert torch.equal(logits(loaded, ids, mask, tid), logits(model, ids, mask, tid))


def test_add_task_init_modes():
    _, model = make()
    perturb_adapters(model)
    wrapper = next(iter(model.adapter_layers.values()))
    model.add_task("mean_task")
    torch.testing.assert_close(wrapper.prompt_fast[3], torch.stack(list(wrapper.prompt_fast[:3])).mean(0))
    model.add_task("zero_task", init="zeros")
    assert not wrapper.prompt_fast[4].any()
    model.add_task("random_task", init="random")
    assert wrapper.prompt_fast[5].abs().sum() > 0
    assert all(p.requires_grad for p in wrapper.prompt_fast)  # without train_only_new everything still trains
    with pytest.raises(ValueError, match=r"init must be one of \['mean', 'zeros', 'random'\] or an existing"):
        model.add_task("bad", init="nope")
    with pytest.raises(ValueError, match="already exists"):
        model.add_task("rte")


def test_generate_with_kv_cache_matches_generation_without_cache():
    _, model = make()
    perturb_adapters(model, std=0.5)
    model.eval()
    ids, mask, _ = tiny_batch(pad=False)
    tid = torch.tensor([0, 1, 2, 1])
    kwargs = dict(input_ids=ids, attention_mask=mask, task_ids=tid, max_new_tokens=4, do_sample=False,
                  pad_token_id=0)
    cached = model.generate(use_cache=True, **kwargs)
    uncached = model.generate(use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_merge_and_export_explain_that_it_is_prompt_based(tmp_path):
    _, model = make()
    with pytest.raises(mtpeft.MergeError, match="prompt-based"):
        model.merge_and_unload(task="rte")
    with pytest.raises(mtpeft.MergeError, match="prompt-based"):
        model.export_peft(tmp_path / "x", task="rte")
    ids, mask, _ = tiny_batch()
    with pytest.raises(mtpeft.MergeError, match="prompt-based"):
        model.export_peft(tmp_path / "x", task="rte", rank=2,
                          calibration=[{"input_ids": ids, "attention_mask": mask, "task_ids": [1] * 4}])
    assert not (tmp_path / "x").exists()


def test_describe_and_layers_to_transform_is_rejected():
    _, model = make(prompt_layers=[2])
    assert "prompts at 1 layers ['model.layers.1.self_attn']" in model.describe()
    with pytest.raises(mtpeft.ConfigError, match="layers_to_transform does not apply to TA-LoRA"):
        mtpeft.TALoRAConfig(tasks=["a"], layers_to_transform=[1])
