"""Multi-task diagnostics: hand-made cases with known answers, and `mtpeft analyze` on a tiny finished run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import perturb_adapters, tiny_batch, tiny_model, toy_run_config

from mtpeft import get_mt_model
from mtpeft.analysis import (
    DIAGNOSTICS,
    alignment_numbers,
    check_diagnostics,
    gradient_conflict,
    layer_similarity,
    mean_routing_stats,
    principal_angles,
    router_diagnostic,
    spectral_alignment,
    subspace_overlap,
    task_subspace_overlap,
)
from mtpeft.analysis.subspace import overlap_table


def _batches(tasks: list[str], n: int = 1) -> dict[str, list[dict[str, torch.Tensor]]]:
    out = {}
    for t, name in enumerate(tasks):
        ids, mask, labels = tiny_batch(batch=3, seq=6, seed=10 + t)
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "task_ids": torch.full((3,), t, dtype=torch.long),
        }
        out[name] = [batch] * n
    return out


# --- gradient conflict ------------------------------------------------------------------------------
def test_opposite_gradients_are_full_conflict() -> None:
    g = torch.randn(5, 3)
    diag = gradient_conflict({"a": {"l1": g, "l2": torch.ones(4)}, "b": {"l1": -g, "l2": -torch.ones(4)}})
    assert diag.applicable
    for entry in diag.data["layers"]:  # both layers and the "(all layers)" row
        assert entry["negative_fraction"] == 1.0
        assert entry["mean_cosine"] == pytest.approx(-1.0)
    assert diag.data["pair_cosine"][0][1] == pytest.approx(-1.0)
    assert diag.rows[0][2] == pytest.approx(100.0)  # "% negative" column
    assert "% negative" in diag.markdown()


def test_aligned_and_mixed_gradients() -> None:
    g = torch.randn(7)
    diag = gradient_conflict({"a": {"l": g}, "b": {"l": 2 * g}, "c": {"l": -g}})
    entry = diag.data["layers"][0]
    assert entry["pairs"] == 3
    assert entry["negative_fraction"] == pytest.approx(2 / 3)  # a-c and b-c conflict, a-b agree
    assert entry["mean_cosine"] == pytest.approx((1 - 1 - 1) / 3)


def test_same_data_through_a_model_agrees_fully() -> None:
    """Two tasks fed the same batch: identical gradients (cosine 1, no conflict) and representations (1)."""
    from mtpeft.analysis import collect_task_gradients, task_mean_hidden_states
    from mtpeft.analysis.common import adapter_parameters

    model = get_mt_model(tiny_model("llama"), {"method": "lora", "tasks": ["a", "b"], "r": 4})
    perturb_adapters(model)  # B != 0, so A gets a gradient too
    same = _batches(["a"])["a"]
    batches = {"a": same, "b": [{**same[0], "task_ids": torch.ones(3, dtype=torch.long)}]}
    grads = collect_task_gradients(model, batches, base_layers=list(model.adapter_layers)[:2])
    diag = gradient_conflict(grads.flat())
    for entry in diag.data["layers"]:
        assert entry["negative_fraction"] == 0.0 and entry["mean_cosine"] == pytest.approx(1.0)
    assert set(grads.base["a"]) == set(list(model.adapter_layers)[:2])
    first = list(model.adapter_layers)[0]
    assert torch.allclose(grads.base["a"][first], grads.base["b"][first])
    assert all(p.grad is None for ps in adapter_parameters(model).values() for _, p in ps)  # left clean
    sim = layer_similarity(task_mean_hidden_states(model, batches))
    assert all(e["mean_cosine"] == pytest.approx(1.0) for e in sim.data["layers"])


# --- spectral alignment ------------------------------------------------------------------------------
def test_spectral_alignment_identical_and_orthogonal_updates() -> None:
    u, v = torch.randn(6, 1), torch.randn(1, 5)
    same = alignment_numbers([u @ v, 2 * (u @ v)], k=1)
    assert same["shared_topk_energy"] == pytest.approx(1.0)
    assert same["task_energy_topk"] == pytest.approx(1.0)
    assert same["cross_alignment_captured"] == pytest.approx(1.0)
    assert same["mean_task_alignment"] == pytest.approx(0.8)  # <M, 2M> * 2 / (1 * (1 + 4) * ||M||^2)
    e = torch.eye(4)
    ortho = alignment_numbers([e[:, :1] @ e[:1], e[:, 1:2] @ e[1:2]], k=1)  # rank-1 updates on other axes
    assert math.isnan(ortho["cross_alignment_captured"])  # the tasks share nothing
    assert ortho["mean_task_alignment"] == pytest.approx(0.0)
    assert ortho["task_energy_topk"] == pytest.approx(0.5)
    diag = spectral_alignment({"a": {"l": u @ v}, "b": {"l": u @ v}}, k=1, sources={"l": "delta"})
    assert diag.applicable and diag.rows[0][3] == pytest.approx(1.0)


# --- layer similarity ------------------------------------------------------------------------------
def test_identical_representations_have_similarity_one() -> None:
    h = torch.randn(4, 16)
    diag = layer_similarity({"a": h, "b": h.clone(), "c": 3 * h})
    assert diag.applicable and len(diag.rows) == 4
    for entry in diag.data["layers"]:
        assert entry["mean_cosine"] == pytest.approx(1.0)
        assert entry["min_cosine"] == pytest.approx(1.0)
    opposite = layer_similarity({"a": h, "b": -h})
    assert opposite.data["layers"][0]["mean_cosine"] == pytest.approx(-1.0)


# --- subspace overlap ------------------------------------------------------------------------------
def test_principal_angles_and_overlap_by_hand() -> None:
    e = torch.eye(5)
    assert subspace_overlap(e[:2], e[2:4]) == pytest.approx(0.0)
    assert principal_angles(e[:2], e[2:4]).tolist() == pytest.approx([90.0, 90.0])
    assert subspace_overlap(e[:2], e[:2] * 3) == pytest.approx(1.0)
    assert subspace_overlap(e[:1], e[:3]) == pytest.approx(1.0)  # nested
    mixed = torch.stack([e[0] + e[2]])
    assert subspace_overlap(e[:1], mixed) == pytest.approx(0.5)
    assert principal_angles(e[:1], mixed).tolist() == pytest.approx([45.0])


def test_orthogonal_thanora_blocks_have_zero_overlap() -> None:
    model = get_mt_model(
        tiny_model("llama"), {"method": "thanora", "tasks": ["a", "b", "c"], "r": 6, "block_init": "orthogonal"}
    )
    diag = task_subspace_overlap(model)
    assert diag.applicable and "ThanoRA" in diag.note
    assert len(diag.rows) == len(model.adapter_layers)
    for entry in diag.data["layers"]:
        assert entry["dims"] == [2, 2, 2]
        assert entry["max_overlap"] == pytest.approx(0.0, abs=1e-10)
        assert entry["mean_min_angle_deg"] == pytest.approx(90.0, abs=1e-4)
    same = overlap_table({"l": {"a": torch.eye(3)[:2], "b": torch.eye(3)[:2]}}, "hand-made")
    assert same.data["layers"][0]["mean_overlap"] == pytest.approx(1.0)


# --- routers ---------------------------------------------------------------------------------------
def test_uniform_routing_has_entropy_log_e() -> None:
    pi = torch.full((2, 5, 1, 4), 0.25)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    usage, entropy = mean_routing_stats(pi, mask)
    assert usage.tolist() == pytest.approx([0.25] * 4)
    assert entropy == pytest.approx(math.log(4))
    one_hot = torch.zeros(3, 1, 4)
    one_hot[..., 2] = 1
    assert mean_routing_stats(one_hot)[1] == pytest.approx(0.0)


def test_hydralora_with_a_uniform_router() -> None:
    model = get_mt_model(
        tiny_model("llama"),
        {
            "method": "hydralora",
            "tasks": ["a", "b"],
            "num_experts": 4,
            "routing_group_size": 16,
            "target_modules": ["q_proj", "v_proj"],
        },
    )
    with torch.no_grad():
        for layer in model.adapter_layers.values():
            layer.lora_router.zero_()  # every token routes 1/E to each expert
    diag = router_diagnostic(model, _batches(["a", "b"]))
    assert diag.applicable and len(diag.rows) == len(model.adapter_layers)
    for entry in diag.data["layers"]:
        assert entry["usage"] == pytest.approx([0.25] * 4)
        assert entry["entropy"] == pytest.approx(math.log(4))
        assert entry["normalized_entropy"] == pytest.approx(1.0)
        assert entry["task_divergence"] == pytest.approx(0.0, abs=1e-12)
    assert (
        not hasattr(next(iter(model.adapter_layers.values())), "_cache_routing")
        or "_cache_routing" not in next(iter(model.adapter_layers.values())).__dict__
    )  # the hook was removed


def test_task_gated_moe_reports_each_task_gate() -> None:
    model = get_mt_model(tiny_model("llama"), {"method": "moe_lora", "tasks": ["a", "b"], "r": 4, "num_experts": 2})
    diag = router_diagnostic(model, _batches(["a", "b"]))
    assert diag.applicable and "task gate" in diag.data["kind"]
    entry = diag.data["layers"][0]
    assert sum(entry["usage"]) == pytest.approx(1.0)
    assert 0 <= entry["normalized_entropy"] <= 1


def test_no_router_is_not_applicable() -> None:
    model = get_mt_model(tiny_model("llama"), {"method": "lora", "tasks": ["a", "b"]})
    diag = router_diagnostic(model, _batches(["a", "b"]))
    assert not diag.applicable and "router" in diag.note


def test_unknown_diagnostic_lists_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="allowed"):
        check_diagnostics("gradient_conflict,bogus")
    assert check_diagnostics(None) == list(DIAGNOSTICS)


# --- end to end ------------------------------------------------------------------------------------
def test_analyze_a_finished_run(tmp_path: Path, tiny_model_dir: Path, capsys, one_thread) -> None:
    from mtpeft.cli import main
    from mtpeft.training.run_config import run_config_from_dict
    from mtpeft.training.trainer import train

    raw = toy_run_config(tmp_path, tiny_model_dir, "hydralora", steps=3, save_every=0)
    raw["method"].update({"num_experts": 3, "target_modules": ["q_proj", "v_proj", "down_proj"]})
    train(run_config_from_dict(raw), progress=False)
    run_dir = Path(raw["output_dir"])
    assert main(["analyze", str(run_dir), "--batches", "1", "--batch-size", "4"]) == 0
    out = run_dir / "analysis"
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == list(DIAGNOSTICS)
    for name in DIAGNOSTICS:
        assert summary[name]["applicable"], (name, summary[name]["note"])
        assert (out / f"{name}.md").read_text().startswith("## ")
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        data = json.loads((out / f"{name}.json").read_text())
        assert data["rows"], name
    report = (out / "report.md").read_text()
    for title in (
        "gradient conflict",
        "Spectral alignment",
        "similarity of task representations",
        "task subspaces",
        "Router usage",
    ):
        assert title.lower() in report.lower()
    assert "analysis written to" in capsys.readouterr().out
