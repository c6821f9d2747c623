"""Adapter-space task alignment diagnostic: known answers on hand-built features, agreement with Align-LoRA's own
loss, and that training with a large align weight lowers the measured inter-task MMD."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from mtpeft import get_mt_model
from mtpeft.analysis import (
    DIAGNOSTICS,
    adapter_alignment,
    check_diagnostics,
    collect_adapter_features,
    mean_distance_ratio,
    task_mmd,
)
from mtpeft.methods.align_lora import MMD_BANDWIDTHS, alignment_loss

VOCAB = 97



def _task_batch(task: int, seed: int, batch: int = 6, seq: int = 8) -> dict[str, torch.Tensor]:
    """Task 0 draws tokens from the lower half of the vocabulary, task 1 from the upper half (distinct inputs, so
    distinct z = A x); the last row is right-padded."""
    g = torch.Generator().manual_seed(seed)
    low, high = (3, VOCAB // 2) if task == 0 else (VOCAB // 2, VOCAB)
    ids = torch.randint(low, high, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100),
            "task_ids": torch.full((batch,), task, dtype=torch.long)}


def _mixed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([a[k], b[k]]) for k in a}


def _align_model(weight: float, pooling: str = "position"):
    torch.manual_seed(0)
    cfg = {"method": "align_lora", "tasks": ["a", "b"], "r": 4, "alpha": 8, "dropout": 0.0,
           "align_loss": "mmd", "align_weight": weight, "align_pooling": pooling}
    return get_mt_model(tiny_model("llama", seed=0, vocab=VOCAB), cfg)


def test_registered_under_its_cli_name() -> None:
    assert "alignment" in DIAGNOSTICS
    assert check_diagnostics("alignment") == ["alignment"]


def test_identical_task_batches_give_zero_mmd_and_ratio(one_thread) -> None:
    """Two tasks fed the same samples: their z sets are identical, so the biased MMD^2 and the mean distance are 0
    (up to float64 rounding), while the within-task halves (different samples) are not."""
    model = _align_model(0.01)
    same = _task_batch(0, seed=1)
    batches = {"a": [same], "b": [{**same, "task_ids": torch.ones_like(same["task_ids"])}]}
    diag = adapter_alignment(model, batches)
    assert diag.applicable and diag.name == "alignment"
    layers = diag.data["layers"]
    assert len(layers) == len(model.adapter_layers)
    for entry in layers:
        assert abs(entry["mmd"]) < 1e-10, entry["layer"]
        assert entry["mean_distance_ratio"] < 1e-10, entry["layer"]
        assert entry["within_mmd"] > 1e-4
        assert entry["z_rms"] > 0
    assert abs(diag.data["summary"]["mmd"]) < 1e-10
    assert diag.rows[0][0] == "(mean over layers)" and "inter-task MMD" in diag.markdown()


@pytest.mark.parametrize("pooling", ["position", "mean"])
@pytest.mark.parametrize("left", [False, True])
def test_task_mmd_is_align_loras_loss_on_the_mixed_batch(pooling: str, left: bool) -> None:
    """Two tasks of different widths padded into one batch give exactly the method's loss on that batch."""
    g = torch.Generator().manual_seed(0)
    za, zb = torch.randn(3, 5, 4, generator=g, dtype=torch.float64), torch.randn(2, 7, 4, generator=g,
                                                                                   dtype=torch.float64)
    ma, mb = torch.ones(3, 5, dtype=torch.float64), torch.ones(2, 7, dtype=torch.float64)
    (ma[0, :2] if left else ma[0, -2:]).zero_()
    got = task_mmd(za, ma, zb, mb, pooling=pooling, left_padded=left)
    pad = (2, 0) if left else (0, 2)
    z = torch.cat([torch.nn.functional.pad(za, (0, 0, *pad)), zb])
    mask = torch.cat([torch.nn.functional.pad(ma, pad), mb])
    ids = torch.tensor([0, 0, 0, 1, 1])
    want = alignment_loss(z, ids, mask, kind="mmd", pooling=pooling, bandwidths=MMD_BANDWIDTHS)
    assert got == pytest.approx(float(want), rel=1e-12, abs=1e-15)
    assert got > 0


def test_mean_distance_ratio_known_value_and_scale_free() -> None:
    """Two tasks of two samples each, one position: means 0 and (d, 0), spreads s^2 = 2 (unbiased) each."""
    za = torch.tensor([[[1.0, 0.0]], [[-1.0, 0.0]]], dtype=torch.float64)
    zb = za + torch.tensor([3.0, 0.0], dtype=torch.float64)
    m = torch.ones(2, 1, dtype=torch.float64)
    assert mean_distance_ratio(za, m, zb, m, "position") == pytest.approx(3 / math.sqrt(2), rel=1e-12)
    assert mean_distance_ratio(7 * za, m, 7 * zb, m, "mean") == pytest.approx(3 / math.sqrt(2), rel=1e-12)
    one = torch.ones(1, 1, dtype=torch.float64)
    assert math.isnan(mean_distance_ratio(za[:1], one, zb[:1], one))  # one sample: no spread to compare with
    # a second position where each task has one fixed value (a template token: no spread) adds its distance^2
    # (1) to the numerator and nothing to the denominator: sqrt((9 + 1) / (2 + 0)), finite
    fixed_a, fixed_b = torch.zeros(2, 1, 2, dtype=torch.float64), torch.zeros(2, 1, 2, dtype=torch.float64)
    fixed_b[..., 0] = 1.0
    m2 = torch.ones(2, 2, dtype=torch.float64)
    got = mean_distance_ratio(torch.cat([za, fixed_a], 1), m2, torch.cat([zb, fixed_b], 1), m2, "position")
    assert got == pytest.approx(math.sqrt(5), rel=1e-12)


def test_plain_lora_is_measured_too_and_features_are_a_x(one_thread) -> None:
    torch.manual_seed(0)
    model = get_mt_model(tiny_model("llama"), {"method": "lora", "tasks": ["a", "b"], "r": 4})
    batches = {"a": [_task_batch(0, 1)], "b": [_task_batch(1, 2, seq=6)]}
    features = collect_adapter_features(model, batches)
    assert set(features.layers) == set(model.adapter_layers) and not features.left_padded
    z, mask = features.layers["model.layers.0.self_attn.q_proj"]["b"]
    assert z.shape == (6, 6, 4) and mask.shape == (6, 6)
    layer = model.adapter_layers["model.layers.0.self_attn.q_proj"]
    captured = {}
    handle = layer.register_forward_pre_hook(lambda _m, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        model(**{k: batches["b"][0][k] for k in ("input_ids", "attention_mask", "task_ids")})
    handle.remove()
    assert torch.allclose(z, (captured["x"] @ layer.lora_A.T).double(), rtol=1e-6, atol=1e-7)
    diag = adapter_alignment(model, batches)
    assert diag.applicable and diag.data["summary"]["mmd"] > 0 and diag.data["pooling"] == "position"


def _train(weight: float, steps: int = 20) -> dict:
    model = _align_model(weight)
    model.train()
    opt = torch.optim.Adam([p for _, p in model.trainable_parameters()], lr=2e-2)
    for step in range(steps):
        batch = _mixed(_task_batch(0, 100 + step), _task_batch(1, 200 + step))
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    held = {"a": [_task_batch(0, 7)], "b": [_task_batch(1, 8)]}
    return adapter_alignment(model, held).data


def test_large_align_weight_lowers_the_measured_mmd(one_thread) -> None:
    """Same seed, same batches: weight 0 is plain LoRA training (it pulls the tasks apart: the MMD grows from 2.3
    at init to 5.2); weight 10 makes the MMD term dominate, so the diagnostic's inter-task MMD ends far lower
    (1.8, held-out batches of the two tasks), and so does the scale-free mean-distance ratio (1.8 -> 0.46): the
    tasks moved together, A did not just shrink."""
    plain, aligned = _train(0.0), _train(10.0)
    assert aligned["summary"]["mmd"] < 0.5 * plain["summary"]["mmd"]
    assert aligned["summary"]["mean_distance_ratio"] < 0.5 * plain["summary"]["mean_distance_ratio"]
    lower = sum(a["mmd"] < p["mmd"] for a, p in zip(aligned["layers"], plain["layers"]))
    assert lower >= 0.8 * len(plain["layers"])


def test_methods_without_a_plain_down_projection_are_not_applicable(one_thread) -> None:
    model = get_mt_model(tiny_model("llama"), {"method": "ta_lora", "tasks": ["a", "b"]})
    diag = adapter_alignment(model, {"a": [_task_batch(0, 1)], "b": [_task_batch(1, 2)]})
    assert not diag.applicable and "down-projection" in diag.note
