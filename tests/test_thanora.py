"""ThanoRA: rank allocation, entropy, calibration, the orthogonality regularizer, task-masked training."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import TASKS, tiny_batch, tiny_model

import mtpeft
from mtpeft.methods.thanora import ThanoRALinear, allocate_ranks, normalized_sv_entropy


def test_allocate_ranks_rounds_enforces_minimum_and_sums_to_total():
    assert allocate_ranks([1, 1, 1], 9) == [3, 3, 3]
    assert allocate_ranks([0.9, 0.3, 0.3], 8) == [5, 2, 1] or sum(allocate_ranks([0.9, 0.3, 0.3], 8)) == 8
    assert allocate_ranks([1.0, 0.0, 0.0], 6) == [4, 1, 1]
    for scores in ([0.7, 0.2, 0.9, 0.5], [1e-9, 1, 1, 1], [0.33, 0.33, 0.34]):
        ranks = allocate_ranks(scores, 16)
        assert sum(ranks) == 16 and min(ranks) >= 1
    with pytest.raises(ValueError):
        allocate_ranks([1, 1, 1], 2)


def test_normalized_entropy_bounds():
    assert normalized_sv_entropy(torch.ones(8)) == pytest.approx(1.0)
    assert normalized_sv_entropy(torch.tensor([1.0, 0, 0, 0])) == pytest.approx(0.0)
    p = torch.tensor([0.5, 0.25, 0.25])
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / math.log(3)
    assert normalized_sv_entropy(p * 7) == pytest.approx(expected)


def test_orthogonality_penalty_matches_hand_computed_blocks():
    model = mtpeft.get_mt_model(tiny_model(), mtpeft.ThanoRAConfig(tasks=TASKS, r=5, target_modules=["q_proj"]))
    layer: ThanoRALinear = next(iter(model.adapter_layers.values()))
    layer.set_allocation([2, 2, 1])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    blocks = [(0, 2), (2, 4), (4, 5)]
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    expected = 0.0
    for i in range(3):
        for j in range(i + 1, 3):
            ai, aj = a[blocks[i][0]:blocks[i][1]], a[blocks[j][0]:blocks[j][1]]
            bi, bj = b[:, blocks[i][0]:blocks[i][1]], b[:, blocks[j][0]:blocks[j][1]]
            expected += (ai @ aj.T).pow(2).sum().item() + (bi.T @ bj).pow(2).sum().item()
    assert layer.orthogonality_penalty(False).item() == pytest.approx(expected, rel=1e-5)
    an = a / a.norm(dim=1, keepdim=True)
    bn = b / b.norm(dim=0, keepdim=True)
    exp_n = sum((an[blocks[i][0]:blocks[i][1]] @ an[blocks[j][0]:blocks[j][1]].T).pow(2).sum().item()
                + (bn[:, blocks[i][0]:blocks[i][1]].T @ bn[:, blocks[j][0]:blocks[j][1]]).pow(2).sum().item()
                for i in range(3) for j in range(i + 1, 3))
    assert layer.orthogonality_penalty(True).item() == pytest.approx(exp_n, rel=1e-5)


def test_regularizer_gradient_reaches_only_A_and_B():
    model = mtpeft.get_mt_model(tiny_model(), mtpeft.ThanoRAConfig(tasks=TASKS, r=6))
    for layer in model.adapter_layers.values():
        with torch.no_grad():
            layer.lora_B.normal_()
    value, weight = model.method.aux_losses(model)["orthogonality"]
    value.backward()
    for name, p in model.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            assert p.grad is not None
        else:
            assert p.grad is None, name


def _calibration_batches():
    batches = []
    for seed in range(3):
        ids, mask, labels = tiny_batch(batch=6, seed=seed)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels,
                        "task_ids": torch.tensor([0, 1, 2, 0, 1, 2])})
    return batches


@pytest.mark.parametrize("complexity", ["activations", "gradients"])
def test_calibration_allocates_saves_and_keeps_identity(complexity, tmp_path):
    base = tiny_model()
    cfg = mtpeft.ThanoRAConfig(tasks=TASKS, r=8, complexity=complexity)
    model = mtpeft.get_mt_model(copy.deepcopy(base), cfg)
    report = model.calibrate(_calibration_batches())
    assert len(report) == len(model.adapter_layers)
    for name, entry in report.items():
        assert sum(entry["ranks"]) == 8 and min(entry["ranks"]) >= 1
        assert all(0 <= h <= 1 for h in entry["entropy"]) and any(h > 0 for h in entry["entropy"])
        assert model.adapter_layers[name].task_ranks == entry["ranks"]
    table = model.describe()
    assert "| layer | sst2 | rte | cola |" in table
    ids, mask, _ = tiny_batch()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   base(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0)
    # data init: each block is orthonormal to the others (up to the common row scale)
    layer = next(iter(model.adapter_layers.values()))
    a = layer.lora_A.detach()
    gram = a @ a.T
    torch.testing.assert_close(gram, torch.eye(8) * gram[0, 0], atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path / "a")
    again = mtpeft.MTModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    assert [la.task_ranks for la in again.adapter_layers.values()] == [
        la.task_ranks for la in model.adapter_layers.values()]


def test_calibration_requires_every_task():
    model = mtpeft.get_mt_model(tiny_model(), mtpeft.ThanoRAConfig(tasks=TASKS, r=6))
    ids, mask, _ = tiny_batch()
    with pytest.raises(ValueError, match=r"no samples of tasks \['cola'\]"):
        model.calibrate([{"input_ids": ids, "attention_mask": mask, "task_ids": torch.tensor([0, 1, 0, 1])}])


def test_task_masked_training_updates_only_the_own_block():
    cfg = mtpeft.ThanoRAConfig(tasks=TASKS, r=6, train_mode="task_masked", ortho_weight=0.0)
    model = mtpeft.get_mt_model(tiny_model(), cfg)
    ids, mask, labels = tiny_batch()
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=torch.tensor([1, 1, 1, 1]))
    out.loss.backward()
    layer = model.adapter_layers["model.layers.1.mlp.down_proj"]
    owner = layer.block_ids()
    grad_b = layer.lora_B.grad
    assert torch.count_nonzero(grad_b[:, owner != 1]) == 0
    assert torch.count_nonzero(grad_b[:, owner == 1]) > 0


# --- issue 14: one token count for every task, the within-block anti-collapse term ---------------------------
def _skewed_calibration(duplicate_first_task: bool):
    """Task 0 has one short batch (fewer tokens than d_in = 32), tasks 1 and 2 many; optionally task 0's batch
    twice."""
    ids, mask, _ = tiny_batch(batch=2, seed=5)
    few = {"input_ids": ids, "attention_mask": mask, "task_ids": torch.tensor([0, 0])}
    batches = [few, *([dict(few)] if duplicate_first_task else [])]
    for seed in range(3):
        ids, mask, _ = tiny_batch(batch=6, seed=seed)
        batches.append({"input_ids": ids, "attention_mask": mask, "task_ids": torch.tensor([1, 2, 1, 2, 1, 2])})
    return batches


def test_allocation_is_invariant_to_duplicating_one_tasks_calibration_tokens():
    base = tiny_model()
    reports = []
    for duplicate in (False, True):
        model = mtpeft.get_mt_model(copy.deepcopy(base), mtpeft.ThanoRAConfig(tasks=TASKS, r=8))
        reports.append(model.calibrate(_skewed_calibration(duplicate)))
    assert reports[0] == reports[1]
    # and every task is scored over the same number of tokens: task 0's few ones cap the others'
    from mtpeft.core.calibration import distinct_token_subsample

    x = torch.randn(10, 4)
    torch.testing.assert_close(distinct_token_subsample(torch.cat([x, x[:3]]), 6, seed=1),
                               distinct_token_subsample(x.flip(0), 6, seed=1))


def test_within_block_anti_collapse_term():
    from mtpeft.methods.thanora import block_collapse

    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 3.0]])[None]
    owner = torch.tensor([[0, 0, 1]])
    # one pair in block 0: cos^2 = 1/2; rows 1 and 2 belong to different blocks (the inter-task term's job)
    torch.testing.assert_close(block_collapse(a, owner), torch.tensor([0.5]))
    model = mtpeft.get_mt_model(tiny_model(), mtpeft.ThanoRAConfig(tasks=TASKS, r=6, block_init="orthogonal"))
    value, weight = model.method.aux_losses(model)["collapse"]
    assert weight == 0.01 and float(value.detach()) < 1e-10  # orthonormal rows at init: the term starts at 0
    off = mtpeft.get_mt_model(tiny_model(), mtpeft.ThanoRAConfig(tasks=TASKS, r=6, collapse_weight=0.0))
    assert "collapse" not in off.method.aux_losses(off)
