"""Align-LoRA's alignment losses against hand-computed values; gradients reach only A."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import TASKS, perturb_adapters, tiny_batch, tiny_model

import mtpeft
from mtpeft.methods.align_lora import alignment_loss, alignment_loss_reference, alignment_losses


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
    cfg = mtpeft.AlignLoRAConfig(tasks=TASKS, r=4, align_loss="kl")  # the released train.py's KL 0.2
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


LAYOUTS = {
    "pairs": [0, 0, 1, 1, 2, 2, 2, 0],
    "some_single": [0, 1, 2, 3, 4, 0, 1, 2],
    "all_single": [0, 1, 2, 3, 4, 5, 6, 7],  # no task has 2 samples: no KL pair is comparable
    "one_task": [3, 3, 3, 3, 3, 3, 3, 3],
}


@pytest.mark.parametrize("kind", ["kl", "mmd"])
@pytest.mark.parametrize("pooling", ["position", "mean"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_alignment_losses_equal_the_per_module_reference(kind, pooling, layout, padded, dtype):
    g = torch.Generator().manual_seed(0)
    widths = [3, 3, 3, 3]
    z = (torch.randn(8, 6, sum(widths), generator=g, dtype=dtype) * 2 + 1).requires_grad_()
    mask = torch.ones(8, 6, dtype=torch.long)
    if padded:
        mask[1, 4:] = 0
        mask[5, 2:] = 0
        mask[7, 1:] = 0
    ids = torch.tensor(LAYOUTS[layout])
    for floor, bandwidths in [(0.0, None), (0.05, [0.5, 2.0, 10.0])]:
        kw = dict(kind=kind, pooling=pooling, variance_floor=floor, num_tasks=9, bandwidths=bandwidths)
        fast = alignment_losses(z, widths, ids, mask, **kw)
        plain = torch.stack([alignment_loss_reference(part, ids, mask, **kw) for part in z.split(widths, -1)])
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
        weights = torch.randn(len(widths), generator=g, dtype=dtype)  # a different upstream gradient per module
        (g_fast,) = torch.autograd.grad((fast * weights).sum(), z)
        (g_plain,) = torch.autograd.grad((plain * weights).sum(), z)
        torch.testing.assert_close(g_fast, g_plain, rtol=1e-5, atol=1e-6)
        if layout in ("all_single", "one_task") and kind == "kl" or layout == "one_task":
            assert torch.count_nonzero(fast) == 0 and torch.count_nonzero(g_fast) == 0


@pytest.mark.parametrize("kind", ["kl", "mmd"])
def test_batched_alignment_losses_with_modules_of_different_widths(kind):
    g = torch.Generator().manual_seed(1)
    widths = [2, 5, 3]
    z = torch.randn(6, 4, sum(widths), generator=g, requires_grad=True)
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    fast = alignment_losses(z, widths, ids, None, kind=kind, variance_floor=0.01)
    plain = torch.stack([alignment_loss_reference(part, ids, None, kind=kind, variance_floor=0.01)
                         for part in z.split(widths, -1)])
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(fast.sum(), z)[0], torch.autograd.grad(plain.sum(), z)[0],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["kl", "mmd"])
def test_model_alignment_loss_and_gradients_equal_the_per_module_reference(kind):
    # float64: backpropagating an fp32 loss of ~80 through the model gives either implementation relative gradient
    # errors of ~5e-5 against the exact values, more than the two differ by in the loss itself
    model = mtpeft.get_mt_model(tiny_model(), mtpeft.AlignLoRAConfig(tasks=TASKS, r=4, align_loss=kind))
    perturb_adapters(model)
    model.train().double()
    ids, mask, labels = tiny_batch(batch=6)
    model.context.collect = True
    model.context.task_ids = torch.tensor([0, 0, 1, 1, 2, 2])
    model.context.token_mask = mask
    model.base_model(input_ids=ids, attention_mask=mask)
    cfg = model.adapter_config
    plain = torch.stack([alignment_loss_reference(layer.cached_down, model.context.task_ids, mask, kind=kind,
                                                  eps=cfg.eps, num_tasks=len(TASKS),
                                                  variance_floor=cfg.variance_floor)
                         for layer in model.adapter_layers.values()]).mean()
    fast, _ = model.method.aux_losses(model)["align"]
    torch.testing.assert_close(fast, plain, rtol=1e-10, atol=1e-12)
    params = [p for _, p in model.trainable_parameters()]
    g_fast = torch.autograd.grad(fast, params, retain_graph=True, allow_unused=True)
    g_plain = torch.autograd.grad(plain, params, allow_unused=True)
    for a, b in zip(g_fast, g_plain):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any())
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_default_is_the_mmd_setting_and_the_released_preset_is_the_released_train_py():
    cfg = mtpeft.AlignLoRAConfig(tasks=TASKS)
    assert (cfg.align_loss, cfg.align_weight) == ("mmd", 0.01)
    released = mtpeft.config_from_dict({"method": "align_lora", "tasks": TASKS, "preset": "released"})
    assert (released.align_loss, released.align_weight, released.variance_floor) == ("kl", 0.2, 0.0)
    assert (released.r, released.alpha, released.dropout) == (8, 32, 0.1)
    assert released.target_modules == ["gate_proj", "up_proj", "down_proj"]
    mixed = mtpeft.config_from_dict({"method": "align_lora", "tasks": TASKS, "preset": "released", "align_loss": "mmd",
                                     "align_weight": 0.01})
    assert (mixed.align_loss, mixed.align_weight, mixed.alpha) == ("mmd", 0.01, 32)
