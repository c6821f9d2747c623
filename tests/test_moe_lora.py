"""MoE-LoRA: task-gated (MOELoRA: exact per-task merges, unknown-task row) and token-gated (top-k)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import TASKS, perturb_adapters, tiny_batch, tiny_model

import mtpeft
from mtpeft.methods.moe_lora import MoELoRALinear


def make(arch: str = "llama", **overrides):
    base = tiny_model(arch)
    cfg = {"method": "moe_lora", "tasks": TASKS, "r": 6, "num_experts": 4, **overrides}
    return base, mtpeft.get_mt_model(copy.deepcopy(base), cfg)


def logits(model, ids, mask, task_ids=None):
    kwargs = {} if task_ids is None else {"task_ids": task_ids}
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs).logits


def test_uneven_rank_split_and_exact_per_task_factors():
    _, model = make(target_modules=["q_proj", "down_proj"])
    assert model.adapter_config.expert_ranks() == [2, 2, 1, 1]
    perturb_adapters(model)
    model.eval()
    layer: MoELoRALinear = model.adapter_layers["model.layers.0.mlp.down_proj"]
    x = torch.randn(3, 5, layer.in_features)
    for t in range(len(TASKS)):
        model.context.task_ids = torch.full((3,), t)
        a, b = layer.lora_factors(t)
        assert a.shape == (6, layer.in_features) and b.shape == (layer.out_features, 6)
        # the explicit sum over experts, each with its own A_e, B_e and gate g_e(t)
        gate = torch.softmax(layer.lora_gate @ layer.lora_task_embedding[t], -1)
        start, expected = 0, torch.zeros(3, 5, layer.out_features)
        for e, rank in enumerate([2, 2, 1, 1]):
            a_e, b_e = layer.lora_A[start:start + rank], layer.lora_B[:, start:start + rank]
            expected += gate[e] * layer.scale * (x @ a_e.T @ b_e.T)
            start += rank
        torch.testing.assert_close(layer.adapter_output(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x @ (b @ a).T, expected, atol=1e-5, rtol=1e-5)


def test_per_task_merges_are_exact_and_mixed_batches_route_per_sample():
    _, model = make()
    perturb_adapters(model)
    model.eval()
    ids, mask, _ = tiny_batch()
    mixed = torch.tensor([1, 2, 0, 1])
    got = logits(model, ids, mask, mixed)
    for t in range(len(TASKS)):
        merged = copy.deepcopy(model).merge_and_unload(task=t)
        rows = mixed == t
        torch.testing.assert_close(got[rows], logits(merged, ids, mask)[rows], atol=1e-4, rtol=0)


def test_unknown_task_row_is_used_without_ids_at_inference_but_training_needs_ids():
    _, model = make()
    perturb_adapters(model)
    model.eval()
    ids, mask, labels = tiny_batch()
    layer = model.adapter_layers["model.layers.1.self_attn.v_proj"]
    assert layer.lora_task_embedding.shape == (len(TASKS) + 1, 64)
    model.context.task_ids = None
    x = torch.randn(2, 3, layer.in_features)
    # row T (= 3) of the embedding is the unknown task: the gate softmax(W_g Emb(3))
    unknown = layer.delta_weight(len(TASKS))
    torch.testing.assert_close(layer.adapter_output(x), x @ unknown.T, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.delta_weight(None), layer.delta_weight(len(TASKS)))
    no_ids = logits(model, ids, mask)
    assert (no_ids - logits(model, ids, mask, 0)).abs().max() > 1e-4
    model.train()
    with pytest.raises(ValueError, match="needs task_ids in training"):
        model(input_ids=ids, attention_mask=mask, labels=labels)


def test_token_gating_top_k_sums_to_one_trains_and_balance_loss_matches_numpy():
    _, model = make(gating="token", top_k=2, target_modules=["v_proj"], balance_weight=0.1)
    assert model.merge_kind == "none"
    perturb_adapters(model)
    model.train()
    ids, mask, labels = tiny_batch()
    inputs = {}
    def keep(mod, args):
        inputs[mod.module_name] = args[0].detach()

    handles = [m.register_forward_pre_hook(keep) for m in model.adapter_layers.values()]
    out = model(input_ids=ids, attention_mask=mask, labels=labels)  # no task ids needed
    for h in handles:
        h.remove()
    out.loss.backward()
    for name, p in model.trainable_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    valid = mask.numpy().astype(bool)
    cvs = []
    for name, x in inputs.items():
        layer = model.adapter_layers[name]
        pi = layer.routing_weights(x)[..., 0, :]
        assert ((pi > 0).sum(-1) == 2).all()
        torch.testing.assert_close(pi.sum(-1), torch.ones(pi.shape[:-1]), atol=1e-6, rtol=0)
        logit = x.numpy() @ layer.lora_router.detach().numpy().T  # numpy: softmax, top-2, renormalize
        probs = np.exp(logit - logit.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        keep = np.argsort(-probs, -1)[..., :2]
        gated = np.zeros_like(probs)
        np.put_along_axis(gated, keep, np.take_along_axis(probs, keep, -1), -1)
        gated /= gated.sum(-1, keepdims=True)
        means = gated[valid].mean(0)
        cvs.append(means.var(ddof=1) / (means.mean() ** 2 + 1e-10))
    assert abs(float(out.aux_losses["balance"]) - np.mean(cvs)) < 1e-5


def test_token_gating_cannot_merge_and_config_errors_name_the_field():
    _, model = make(gating="token")
    with pytest.raises(mtpeft.MergeError, match="routes each token"):
        model.merge_and_unload(task="rte")
    with pytest.raises(mtpeft.ConfigError, match=r"MoELoRAConfig\.gating must be one of \['task', 'token'\]"):
        mtpeft.MoELoRAConfig(tasks=TASKS, gating="sample")
    with pytest.raises(mtpeft.ConfigError, match=r"num_experts \(8\) must be <= r \(4\)"):
        mtpeft.MoELoRAConfig(tasks=TASKS, r=4, num_experts=8)
    with pytest.raises(mtpeft.ConfigError, match="needs the list of tasks"):
        mtpeft.MoELoRAConfig(gating="task")
    assert mtpeft.MoELoRAConfig(gating="token").tasks == []


def test_moelora_init_draws_down_projections_from_n0_001_as_the_official_copies():
    cfg = mtpeft.MoELoRAConfig(tasks=TASKS, r=16, num_experts=4, init="moelora", target_modules=["gate_proj"])
    torch.manual_seed(0)
    model = mtpeft.get_mt_model(tiny_model(), cfg)
    a = torch.cat([layer.lora_A.detach().reshape(-1) for layer in model.adapter_layers.values()])
    assert abs(float(a.std()) - 0.01) < 0.001 and abs(float(a.mean())) < 0.001
    assert all(not layer.lora_B.detach().any() for layer in model.adapter_layers.values())
    released = mtpeft.config_from_dict({"method": "moe_lora", "tasks": TASKS, "preset": "released"})
    assert (released.init, released.num_experts) == ("moelora", 8)
    with pytest.raises(mtpeft.ConfigError, match=r"init must be one of \['kaiming', 'gaussian'\]"):
        mtpeft.LoRAConfig(init="moelora")  # only MoE-LoRA has it
