"""HydraLoRA: routing, fine-grained routing, the CV^2 balance loss (checked with numpy), parameter counts."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import TASKS, perturb_adapters, tiny_batch, tiny_model

import mtpeft
from mtpeft.core.routing import balance_loss, cv_squared, routed_up, routing_statistics
from mtpeft.methods.hydralora import HydraLoRALinear


def make(arch: str = "llama", **overrides):
    base = tiny_model(arch)
    cfg = {"method": "hydralora", "tasks": TASKS, "r": 4, "num_experts": 3, **overrides}
    return base, mtpeft.get_mt_model(copy.deepcopy(base), cfg)


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_forward_backward_mixed_batch_and_fgr_router_weights_sum_to_one():
    _, model = make(routing_group_size=8)  # q/o: 32 outputs -> 4 groups; k/v: 16 -> 2; MLP 48 / 32 -> 6 / 4
    perturb_adapters(model)
    model.train()
    ids, mask, labels = tiny_batch()
    seen = {}

    def hook(module, args):
        seen[module.module_name] = module.routing_weights(args[0]).detach()

    handles = [m.register_forward_pre_hook(hook) for m in model.adapter_layers.values()]
    out = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=torch.tensor([0, 2, 1, 0]))
    for h in handles:
        h.remove()
    out.loss.backward()
    layer = model.adapter_layers["model.layers.0.self_attn.q_proj"]
    assert layer.num_groups == 4 and model.adapter_layers["model.layers.0.self_attn.k_proj"].num_groups == 2
    for name, pi in seen.items():
        assert pi.shape[-2:] == (model.adapter_layers[name].num_groups, 3)
        torch.testing.assert_close(pi.sum(-1), torch.ones(pi.shape[:-1]), atol=1e-6, rtol=0)
    for name, p in model.trainable_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert "balance" in out.aux_losses


def test_routed_up_matches_an_explicit_loop_over_experts_and_groups():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 3, generator=g)
    pi = torch.softmax(torch.randn(2, 5, 4, 6, generator=g), -1)  # G = 4 groups, E = 6 experts
    b = torch.randn(6, 8, 3, generator=g)  # d_out = 8 -> group size 2
    expected = torch.zeros(2, 5, 8)
    for e in range(6):
        weight = pi[..., e].repeat_interleave(2, dim=-1)  # (2, 5, 8)
        expected += weight * (z @ b[e].T)
    torch.testing.assert_close(routed_up(z, pi, b), expected, atol=1e-5, rtol=1e-5)


def test_cv_squared_and_masked_mean_routing_match_numpy():
    rng = np.random.default_rng(0)
    pi = np_softmax(rng.normal(size=(3, 4, 2, 5)))  # batch, tokens, groups, experts
    mask = np.ones((3, 4))
    mask[2, 1:] = 0
    mean, count = routing_statistics(torch.tensor(pi), torch.tensor(mask))
    got = cv_squared(mean)
    valid = pi[mask.astype(bool)]  # (tokens, groups, experts)
    means = valid.reshape(-1, 5).mean(0)
    expected = means.var(ddof=1) / (means.mean() ** 2 + 1e-10)
    assert abs(float(got) - expected) < 1e-6
    assert int(count) == valid.reshape(-1, 5).shape[0]  # (token, group) entries averaged
    assert float(cv_squared(torch.ones(1))) == 0.0


def test_balance_loss_of_a_training_forward_matches_numpy_and_enters_the_loss():
    _, model = make(target_modules=["q_proj", "v_proj"], balance_weight=0.5)
    perturb_adapters(model)
    model.train()
    ids, mask, labels = tiny_batch()
    inputs = {}
    def keep(mod, args):
        inputs[mod.module_name] = args[0].detach()

    handles = [m.register_forward_pre_hook(keep) for m in model.adapter_layers.values()]
    out = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=torch.tensor([0, 1, 2, 0]))
    for h in handles:
        h.remove()
    valid = mask.numpy().astype(bool)
    per_layer = []
    for name, x in inputs.items():
        w = model.adapter_layers[name].lora_router.detach().numpy()
        pi = np_softmax(x.numpy() @ w.T)[valid]  # scalar routing: (valid tokens, E)
        means = pi.mean(0)
        per_layer.append(means.var(ddof=1) / (means.mean() ** 2 + 1e-10))
    assert abs(float(out.aux_losses["balance"]) - np.mean(per_layer)) < 1e-5
    model.eval()  # no auxiliary losses outside training: the difference is exactly the weighted balance loss
    plain = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(float((out.loss - plain).detach()) - 0.5 * np.mean(per_layer)) < 1e-5


def test_fgr_group_size_must_divide_out_features():
    with pytest.raises(mtpeft.ConfigError, match="routing_group_size=5 must divide the output dimension 32"):
        make(routing_group_size=5, target_modules=["q_proj"])
    with pytest.raises(mtpeft.ConfigError, match=r"HydraLoRAConfig\.num_experts must be a positive integer"):
        mtpeft.HydraLoRAConfig(num_experts=0)


def test_not_mergeable_and_export_needs_rank():
    _, model = make()
    assert model.merge_kind == "none"
    with pytest.raises(mtpeft.MergeError, match="routes each token"):
        model.merge_and_unload()
    with pytest.raises(mtpeft.MergeError, match="rank=k"):
        model.export_peft("/nonexistent/never-written")


def test_parameter_count_at_paper_setting_on_meta_llama2_7b():
    import transformers as tf

    with torch.device("meta"):
        base = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=4096, intermediate_size=11008,
                                                  num_hidden_layers=32, num_attention_heads=32,
                                                  vocab_size=32000))
    model = mtpeft.get_mt_model(base, {"method": "hydralora", "r": 16, "alpha": 64, "num_experts": 16,
                                       "target_modules": ["q_proj", "v_proj"]})
    assert model.num_trainable_parameters() == 75_497_472
    layer = model.adapter_layers["model.layers.0.self_attn.q_proj"]
    assert isinstance(layer, HydraLoRALinear) and layer.lora_B.device.type == "meta"


def test_batched_balance_loss_equals_the_mean_of_per_adapter_cv_squared():
    g = torch.Generator().manual_seed(0)
    means = [torch.softmax(torch.randn(5, generator=g), 0).requires_grad_() for _ in range(7)]
    fast = balance_loss(means)
    plain = torch.stack([cv_squared(m) for m in means]).mean()
    torch.testing.assert_close(fast, plain, rtol=1e-6, atol=1e-9)
    for a, b in zip(torch.autograd.grad(fast, means), torch.autograd.grad(plain, means)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    single = [torch.ones(1), torch.ones(1)]  # one expert: CV^2 is 0 by definition
    assert float(balance_loss(single)) == 0.0
