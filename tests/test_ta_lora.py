"""TA-LoRA (reconstruction): input-level and deep prompts, zero-init gates, fast/slow parameter groups, adding
tasks, generation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import TASKS, perturb_adapters, tiny_batch, tiny_model

import mtpeft
from mtpeft.methods.ta_lora import InputPrompt, PromptAttention

VARIANTS = [("input", "prompt"), ("input", "task"), ("deep", "prompt"), ("deep", "task")]


def make(arch: str = "llama", **overrides):
    base = tiny_model(arch)
    cfg = {"method": "ta_lora", "tasks": TASKS, "r": 4, "prompt_length": 3, **overrides}
    return base, mtpeft.get_mt_model(copy.deepcopy(base), cfg)


def logits(model, ids, mask, task_ids=None):
    kwargs = {} if task_ids is None else {"task_ids": task_ids}
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs).logits


@pytest.mark.parametrize("position", ["input", "deep"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_initial_logits_equal_base_exactly(arch, position):
    base, model = make(arch, prompt_layers=[1, 2], prompt_position=position)
    assert sum(isinstance(m, PromptAttention) for m in model.adapter_layers.values()) == 2
    ids, mask, _ = tiny_batch()
    torch.testing.assert_close(logits(model, ids, mask, torch.tensor([0, 1, 2, 0])), logits(base, ids, mask),
                               atol=1e-5, rtol=0)


def test_default_prompt_layers_are_half_three_quarters_and_last():
    cfg = mtpeft.TALoRAConfig(tasks=["a"], prompt_position="deep")
    assert cfg.resolved_layers(28) == [14, 21, 28]
    assert cfg.resolved_layers(32) == [16, 24, 32]
    assert cfg.resolved_layers(2) == [1, 2]
    with pytest.raises(mtpeft.ConfigError, match=r"prompt_layers \[5\] exceed the model's 2 layers"):
        make(prompt_layers=[1, 5])
    with pytest.raises(mtpeft.ConfigError, match=r"TALoRAConfig\.prompt_layers must be None or a non-empty"):
        mtpeft.TALoRAConfig(tasks=["a"], prompt_layers=[0])
    # an input prompt is a prefix of the whole model: by default every layer reads it
    assert mtpeft.TALoRAConfig(tasks=["a"], prompt_position="input").resolved_layers(4) == [1, 2, 3, 4]


def test_prompt_attention_matches_an_explicit_per_head_computation():
    """Qwen2 (q/k/v biases, 4 query heads sharing 2 kv heads): compare with loops over heads."""
    _, model = make("qwen2", prompt_layers=[2], prompt_position="deep", gate="prompt")
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


@pytest.mark.parametrize("position,gate", VARIANTS)
def test_forward_backward_mixed_batch_reaches_every_parameter_and_needs_task_ids(position, gate):
    _, model = make(prompt_position=position, gate=gate)
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
    _, model = make(prompt_position="deep", gate="prompt")
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


@pytest.mark.parametrize("position,gate", VARIANTS)
def test_add_task_then_training_changes_only_the_new_fast_weights(tmp_path, position, gate):
    base, model = make(prompt_position=position, gate=gate)
    perturb_adapters(model)
    ids, mask, labels = tiny_batch()
    model.eval()
    old_logits = {t: logits(model, ids, mask, t) for t in range(len(TASKS))}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tid = model.add_task("mnli", init="rte", train_only_new=True)
    assert tid == 3 and model.tasks == [*TASKS, "mnli"]
    holders = {n: m for n, m in model.adapter_layers.items() if hasattr(m, "prompt_fast")}
    wrapper = next(iter(holders.values()))
    assert torch.equal(wrapper.prompt_fast[3], wrapper.prompt_fast[1])
    new_names = {f"base_model.{name}.prompt_fast.3" for name in holders}
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


@pytest.mark.parametrize("position", ["input", "deep"])
def test_add_task_init_modes(position):
    _, model = make(prompt_position=position)
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


@pytest.mark.parametrize("position,gate", VARIANTS)
def test_generate_with_kv_cache_matches_generation_without_cache(position, gate):
    _, model = make(prompt_position=position, gate=gate)
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



def test_describe_and_layers_to_transform_choose_the_prompted_layers():
    _, model = make(prompt_layers=[2], prompt_position="deep")
    assert "prompts at 1 layers ['model.layers.1.self_attn']" in model.describe()
    # the common key (0-based, as every method) is honoured; prompt_layers stays as its older 1-based spelling
    _, same = make(layers_to_transform=[1], prompt_position="deep")
    assert "prompts at 1 layers ['model.layers.1.self_attn']" in same.describe()
    _, inp = make(layers_to_transform=[1], prompt_position="input")
    assert [type(m).__name__ for m in inp.adapter_layers.values()] == ["InputPrompt", "PromptAttention"]
    assert "input prompt" in inp.describe() and "'model.layers.1.self_attn'" in inp.describe()
    with pytest.raises(mtpeft.ConfigError, match="layers_to_transform .0-based. or its older 1-based spelling"):
        mtpeft.TALoRAConfig(tasks=["a"], layers_to_transform=[1], prompt_layers=[2])
    with pytest.raises(mtpeft.ConfigError, match=r"layers_to_transform \[2\] exceed the model's 2 layers .allowed: 0"):
        make(layers_to_transform=[2])
    with pytest.raises(mtpeft.ConfigError, match="prompt_position must be one of"):
        mtpeft.TALoRAConfig(tasks=["a"], prompt_position="middle")
    with pytest.raises(mtpeft.ConfigError, match="gate must be one of"):
        mtpeft.TALoRAConfig(tasks=["a"], gate="all")


def test_demo_and_bench_use_the_common_layer_key():
    from mtpeft.bench.plan import _adapt_top_layers
    from mtpeft.training.demo import demo_config

    method = demo_config("ta_lora")["method"]
    if "layers_to_transform" in method:  # CPU: the top third of the layers
        assert "prompt_layers" not in method and method["layers_to_transform"] == list(range(20, 30))
    cfg = {"method": "ta_lora"}
    _adapt_top_layers(cfg, 2, tiny_model().config)
    assert cfg == {"method": "ta_lora", "layers_to_transform": [0, 1]}
    # the bench gives TA-LoRA its dataclass defaults (plus the protocol's common rank and dropout)
    from mtpeft.bench.defaults import BENCH_COMMON, method_defaults

    defaults = mtpeft.TALoRAConfig(tasks=["a"])
    extra = {k: v for k, v in method_defaults("ta_lora").items() if k not in BENCH_COMMON and k != "method"}
    assert all(getattr(defaults, k) == v for k, v in extra.items()), extra


def test_input_prefix_states_are_the_decoder_run_on_the_prompt_alone():
    """The prefix the real tokens read at layer i is the prompt's hidden state entering that layer's attention."""
    base, model = make(prompt_position="input")
    perturb_adapters(model)
    prompt_layer = model.adapter_layers["model.embed_tokens"]
    assert isinstance(prompt_layer, InputPrompt) and prompt_layer.prompted  # the analysis reads its prompts
    assert not any(m.prompted for m in model.adapter_layers.values() if isinstance(m, PromptAttention))
    ids, mask, _ = tiny_batch()
    tid = torch.tensor([2, 0, 2, 1])
    logits(model, ids, mask, tid)
    prefix = prompt_layer.prefix
    with torch.no_grad():
        embeds = prompt_layer.task_prompts(tid)
        hidden = base.model(inputs_embeds=embeds, output_hidden_states=True).hidden_states
        for i in range(2):
            expected = base.model.layers[i].input_layernorm(hidden[i])
            torch.testing.assert_close(prefix.prompts_for(f"model.layers.{i}.self_attn", model.context.task_ids),
                                       expected, atol=1e-5, rtol=1e-5)
    # one prefix row per distinct task, not per batch row
    assert prefix.states["model.layers.0.self_attn"].shape[0] == 3
    with pytest.raises(ValueError, match="did not pass through the input embedding"):
        model(inputs_embeds=base.model.embed_tokens(ids), attention_mask=mask, task_ids=tid)


@pytest.mark.parametrize("position", ["input", "deep"])
def test_gradients_at_init_depend_on_what_the_gate_covers(position):
    """gate='prompt' gates the whole prompt attention: at init only the gates get a gradient. gate='task' gates only
    B A_t: P_0 and the gate learn from the first step, B and A_t once the gate has opened."""
    ids, mask, labels = tiny_batch()
    tid = torch.tensor([0, 1, 2, 0])
    grads = {}
    for gate in ("prompt", "task"):
        _, model = make(prompt_position=position, gate=gate)
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=tid).loss.backward()
        grads[gate] = {}
        for name, p in model.trainable_parameters():
            leaf = name.rsplit(".", 1)[-1] if "prompt_fast" not in name else "prompt_fast"
            grads[gate][leaf] = grads[gate].get(leaf, 0.0) + float(p.grad.abs().sum())
    assert grads["prompt"]["prompt_gate"] > 0
    assert grads["prompt"]["prompt_shared"] == grads["prompt"]["prompt_slow"] == grads["prompt"]["prompt_fast"] == 0
    assert grads["task"]["prompt_gate"] > 0 and grads["task"]["prompt_shared"] > 0
    assert grads["task"]["prompt_slow"] == grads["task"]["prompt_fast"] == 0
    # after one step the gate is open and B, A_t get a gradient too
    opt = torch.optim.SGD([p for _, p in model.trainable_parameters()], lr=0.1)
    opt.step()
    opt.zero_grad()
    model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=tid).loss.backward()
    for name, p in model.trainable_parameters():
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("gate", ["prompt", "task"])
def test_input_prompt_trains_a_few_steps_lower_the_loss(gate):
    _, model = make(prompt_position="input", gate=gate)
    model.train()
    ids, mask, labels = tiny_batch()
    tid = torch.tensor([0, 1, 2, 0])
    opt = torch.optim.AdamW(model.param_groups(lr=5e-2))
    holder = model.adapter_layers["model.embed_tokens"]
    fast_before = holder.prompt_fast[0].detach().clone()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=tid).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05, losses
    assert not torch.equal(holder.prompt_fast[0], fast_before)  # the fast weights moved


@pytest.mark.parametrize("position", ["input", "deep"])
def test_generation_at_init_equals_the_base_model(position):
    base, model = make(prompt_position=position, gate="prompt")
    ids, mask, _ = tiny_batch(pad=False)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = base.generate(**kwargs)
    assert torch.equal(model.generate(task_ids=torch.tensor([0, 1, 2, 1]), **kwargs), expected)


def test_input_prompt_refuses_fsdp_sharded_layers_with_a_clear_error():
    """Under FSDP2 (layers re-classed as FSDP<Layer>) the prefix's second pass crashed: it is refused instead."""
    _, model = make(prompt_position="input")
    layer = model.base_model.model.layers[0]
    layer.__class__ = type(f"FSDP{type(layer).__name__}", (type(layer),), {})
    ids, mask, _ = tiny_batch()
    with pytest.raises(mtpeft.ConfigError, match="'input' does not run under FSDP"):
        model(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 1, 2, 0]))
