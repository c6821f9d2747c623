"""Align-LoRA's alignment losses against hand-computed values; gradients reach only A."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import TASKS, tiny_batch, tiny_model

import mtpeft
from mtpeft.methods.align_lora import alignment_loss


def _sym_kl(m1, v1, m2, v2):
    kl12 = 0.5 * (math.log(v2) - math.log(v1) + (v1 + (m1 - m2) ** 2) / v2 - 1)
    kl21 = 0.5 * (math.log(v1) - math.log(v2) + (v2 + (m1 - m2) ** 2) / v1 - 1)
    return 0.5 * (kl12 + kl21)


def test_kl_matches_hand_computed_case_with_padding_masked():
    # 4 samples, 2 positions, r = 1. Tasks: 0,0,1,1. Position 1 of sample 3 is padding (ignored).
    z = torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]], [[0.0], [1.0]], [[2.0], [99.0]]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 0]])
    tid = torch.tensor([0, 0, 1, 1])
    got = alignment_loss(z, tid, mask, kind="kl", eps=0.0)
    # position 0: task0 {1,3} mean 2 var 2; task1 {0,2} mean 1 var 2. Position 1: task1 has 1 valid sample -> skip.
    expected = _sym_kl(2.0, 2.0, 1.0, 2.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_kl_pooled_variant_uses_masked_token_means():
    z = torch.tensor([[[1.0], [3.0]], [[2.0], [2.0]], [[5.0], [7.0]], [[4.0], [100.0]]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 0]])
    tid = torch.tensor([0, 0, 1, 1])
    got = alignment_loss(z, tid, mask, kind="kl", pooling="mean", eps=0.0)
    # pooled: task0 {2, 2} var 0 -> eps 0 would blow up, so check with eps
    got = alignment_loss(z, tid, mask, kind="kl", pooling="mean", eps=1e-3)
    expected = _sym_kl(2.0, 0.0 + 1e-3, 5.0, 2.0 + 1e-3)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_mmd_matches_hand_computed_case():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 1, 2)), rng.normal(size=(3, 1, 2)) + 1.0
    z = torch.tensor(np.concatenate([a, b]), dtype=torch.float64)
    tid = torch.tensor([0, 0, 1, 1, 1])
    bw = [0.5, 2.0]

    def k(x, y):
        return sum(math.exp(-np.sum((x - y) ** 2) / (2 * s)) for s in bw)

    def mean_k(xs, ys):
        return np.mean([k(x, y) for x in xs for y in ys])

    xa, xb = a[:, 0], b[:, 0]
    expected = mean_k(xa, xa) + mean_k(xb, xb) - 2 * mean_k(xa, xb)
    got = alignment_loss(z, tid, None, kind="mmd", bandwidths=bw)
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_alignment_loss_in_model_reaches_only_lora_A():
    cfg = mtpeft.AlignLoRAConfig(tasks=TASKS, r=4)
    model = mtpeft.get_mt_model(tiny_model(), cfg)
    ids, mask, labels = tiny_batch(batch=6)
    model.train()
    out = model(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 0, 1, 1, 2, 2]))
    assert set(out.aux_losses) == {"align"} and out.aux_losses["align"] > 0
    assert out.loss is None  # no labels: nothing to add the auxiliary loss to
    # recompute the weighted aux term alone and check which parameters it reaches
    model.context.collect = True
    model.context.task_ids = torch.tensor([0, 0, 1, 1, 2, 2])
    model.context.token_mask = mask
    model.base_model(input_ids=ids, attention_mask=mask)
    value, weight = model.method.aux_losses(model)["align"]
    assert weight == pytest.approx(0.2)
    value.backward()
    # z = A x depends on A and, through x, on upstream adapters; nothing downstream of the last module's B
    # enters any z, so its gradient is exactly zero, and every A gets a gradient.
    last = model.adapter_layers["model.layers.1.mlp.down_proj"]
    assert last.lora_B.grad is None or torch.count_nonzero(last.lora_B.grad) == 0
    for name, layer in model.adapter_layers.items():
        assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.base_model.parameters() if not p.requires_grad)


def test_total_loss_is_model_loss_plus_weighted_alignment():
    cfg = mtpeft.AlignLoRAConfig(tasks=TASKS, r=4, align_loss="mmd")
    assert cfg.align_weight == pytest.approx(0.01)
    model = mtpeft.get_mt_model(tiny_model(), cfg)
    ids, mask, labels = tiny_batch(batch=6)
    model.train()
    torch.manual_seed(0)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=torch.tensor([0, 0, 1, 1, 2, 2]))
    plain = model.base_model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert out.loss.item() == pytest.approx(plain.item() + 0.01 * out.aux_losses["align"].item(), rel=1e-5)


def test_align_needs_task_ids_in_training_only():
    model = mtpeft.get_mt_model(tiny_model(), mtpeft.AlignLoRAConfig(tasks=TASKS, r=4))
    ids, mask, labels = tiny_batch()
    model.train()
    with pytest.raises(ValueError, match="needs task_ids"):
        model(input_ids=ids, attention_mask=mask, labels=labels)
    model.eval()
    model(input_ids=ids, attention_mask=mask)


def test_variance_floor_keeps_kl_finite_where_a_task_has_identical_samples():
    # one position, r = 1: task 0's two samples coincide (zero variance), task 1's differ
    z = torch.tensor([[[1.0]], [[1.0]], [[3.0]], [[5.0]]])
    ids = torch.tensor([0, 0, 1, 1])
    bare = alignment_loss(z, ids, None, eps=1e-8)
    floored = alignment_loss(z, ids, None, eps=1e-8, variance_floor=0.1)
    # by hand: overall unbiased variance of [1, 1, 3, 5] = 11/3; floor 0.1 * 11/3 for task 0; task 1 keeps 2
    v0, v1, m0, m1 = 0.1 * 11 / 3 + 1e-8, 2.0 + 1e-8, 1.0, 4.0
    kl01 = 0.5 * (math.log(v1 / v0) + (v0 + (m0 - m1) ** 2) / v1 - 1)
    kl10 = 0.5 * (math.log(v0 / v1) + (v1 + (m0 - m1) ** 2) / v0 - 1)
    assert float(floored) == pytest.approx(0.5 * (kl01 + kl10), rel=1e-5)
    assert float(bare) > 1e8 > float(floored)
    with pytest.raises(mtpeft.ConfigError, match="variance_floor"):
        mtpeft.get_mt_model(tiny_model(), {"method": "align_lora", "tasks": TASKS, "variance_floor": -1})
