"""MTL-LoRA's forward equals its formula computed by hand for each task."""

from __future__ import annotations

import pytest
import torch
from conftest import TASKS, perturb_adapters, tiny_model

import mtpeft


@pytest.mark.parametrize("diagonal", [False, True])
def test_forward_matches_formula(diagonal):
    cfg = mtpeft.MTLLoRAConfig(tasks=TASKS, r=4, alpha=8, num_up_projections=3, temperature=0.5,
                               diagonal_lambda=diagonal, target_modules=["q_proj"])
    model = mtpeft.get_mt_model(tiny_model(), cfg)
    perturb_adapters(model)
    layer = next(iter(model.adapter_layers.values()))
    x = torch.randn(3, 5, layer.in_features)
    model.context.task_ids = torch.tensor([2, 0, 1])
    got = layer(x)
    for row, t in enumerate([2, 0, 1]):
        lam = torch.diag(layer.lora_lambda[t]) if diagonal else layer.lora_lambda[t]
        w = torch.softmax(layer.mix_logits[t] / 0.5, -1)
        b_bar = sum(w[i] * layer.lora_B[i] for i in range(3))
        expected = layer.base_layer(x[row]) + 2.0 * (b_bar @ lam @ layer.lora_A @ x[row].T).T
        torch.testing.assert_close(got[row], expected, atol=1e-5, rtol=1e-5)


def test_lambda_starts_at_identity_and_counts():
    cfg = mtpeft.MTLLoRAConfig(tasks=TASKS, r=4, target_modules=["q_proj"])
    model = mtpeft.get_mt_model(tiny_model(), cfg)
    layer = next(iter(model.adapter_layers.values()))
    assert torch.equal(layer.lora_lambda[1], torch.eye(4))
    per_layer = 4 * 32 + 3 * 4 * 4 + 3 * 32 * 4 + 3 * 3
    assert model.num_trainable_parameters() == 2 * per_layer
