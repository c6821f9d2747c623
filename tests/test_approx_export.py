"""Approximate plain-LoRA export of input-routed adapters (mtpeft.io.approx) and loading it in PEFT."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import TASKS, perturb_adapters, tiny_batch, tiny_model

import mtpeft
from mtpeft.io.approx import approximate_factors


def calibration(seed: int = 1):
    ids, mask, labels = tiny_batch(seed=seed)
    task_ids = torch.tensor([0, 1, 2, 1])
    return [{"input_ids": ids, "attention_mask": mask, "labels": labels, "task_ids": task_ids}]


def make(base, method: str, **overrides):
    cfg = {"method": method, "tasks": TASKS, "r": 4, "num_experts": 3, **overrides}
    model = mtpeft.get_mt_model(copy.deepcopy(base), cfg)
    perturb_adapters(model)
    return model.eval()


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def zero_routers(model) -> None:
    with torch.no_grad():
        for layer in model.adapter_layers.values():
            layer.lora_router.zero_()


@pytest.mark.parametrize("method", ["hydralora", "moe_lora"])
def test_input_independent_routing_at_full_rank_is_exact_and_loads_in_peft(method, tmp_path):
    """A zero router gives uniform routing, so the expected update is the update: the export must be exact."""
    from peft import PeftModel

    base = tiny_model("llama")
    extra = {"gating": "token", "top_k": 3} if method == "moe_lora" else {"routing_group_size": 8}
    model = make(base, method, **extra)
    zero_routers(model)
    ids, mask, _ = tiny_batch(seed=5)
    expected = logits(model, ids, mask)
    report = model.export_peft(tmp_path / "peft", task="rte", rank=48, calibration=calibration())
    assert not report["exact"] and report["relative_error"] < 1e-5
    assert max(report["module_errors"].values()) < 1e-5 and len(report["module_errors"]) == 14
    assert report["calibration_tokens"] == 7 + 5  # the two 'rte' rows; the last row has 2 padding tokens
    assert json.loads((tmp_path / "peft" / "mtpeft_export.json").read_text())["relative_error"] < 1e-5
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(peft_model, ids, mask), expected, atol=1e-4, rtol=0)


def test_input_dependent_routing_reports_a_nonzero_error_that_grows_as_rank_shrinks():
    base = tiny_model("llama")
    model = make(base, "hydralora", target_modules=["q_proj", "down_proj"])
    _, full = approximate_factors(model, None, 48, calibration())
    _, low = approximate_factors(model, None, 1, calibration())
    assert full["relative_error"] > 1e-3  # routing varies by token: the expectation is not exact
    assert low["relative_error"] > full["relative_error"]
    assert all(low["truncation_errors"][n] > 0 for n in low["truncation_errors"])
    assert {len(v) for v in full["mean_routing"].values()} == {1}  # scalar routing: G = 1 row of E weights


def test_reported_module_error_matches_an_independent_measurement():
    base = tiny_model("llama")
    model = make(base, "hydralora", target_modules=["v_proj"])
    cal = calibration()
    factors, report = approximate_factors(model, "rte", 2, cal)
    name = "model.layers.1.self_attn.v_proj"
    layer = model.adapter_layers[name]
    captured = []
    handle = layer.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    rows = cal[0]["task_ids"] == 1
    with torch.no_grad():
        model(input_ids=cal[0]["input_ids"][rows], attention_mask=cal[0]["attention_mask"][rows])
        handle.remove()
        x = captured[0][cal[0]["attention_mask"][rows].bool()]
        true = layer.adapter_output(x)
        a, b = factors[name]
        approx = x @ a.T @ b.T
    expected = float(torch.linalg.norm(approx - true) / torch.linalg.norm(true))
    assert report["module_errors"][name] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("block_type", ["ffn", "attn"])
def test_mtlora_blocks_are_fitted_onto_the_output_linear_and_load_in_peft(block_type, tmp_path):
    from peft import PeftModel

    base = tiny_model("llama")
    model = make(base, "mtlora", block_type=block_type, routing_group_size=16)
    out_name = "down_proj" if block_type == "ffn" else "o_proj"
    report = model.export_peft(tmp_path / "peft", rank=4, calibration=calibration())
    assert report["target_modules"] == [out_name]
    block = "mlp" if block_type == "ffn" else "self_attn"
    assert set(report["module_errors"]) == {f"model.layers.{i}.{block}.{out_name}" for i in range(2)}
    assert 0 < report["relative_error"] < 1
    assert set(report["module_kinds"].values()) == {"block"}
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    ids, mask, _ = tiny_batch()
    assert (logits(peft_model, ids, mask) - logits(base, ids, mask)).abs().max() > 1e-4
    # more rank never fits the calibration tokens worse (rank 32 = full rank of the fitted 32 x d_h map)
    _, full = approximate_factors(model, None, 32, calibration())
    assert full["relative_error"] <= report["relative_error"] + 1e-9


def test_block_fit_is_exact_when_the_delta_is_a_linear_map_of_the_output_linear_input():
    """If Delta(u) happens to equal W h for the down_proj input h, least squares must recover W (error ~0)."""
    base = tiny_model("llama")
    model = make(base, "mtlora", block_type="ffn", routing_group_size=None)
    cal = calibration(1) + calibration(2) + calibration(3)  # 78 tokens > 48 = dim(h): W is determined
    target = torch.randn(32, 48) * 0.1
    for layer in model.adapter_layers.values():
        store = {}
        layer.output_linear().register_forward_pre_hook(
            lambda m, args, _s=store: _s.__setitem__("h", args[0]))
        layer.block_delta = lambda u, _s=store: _s["h"] @ target.T  # replaces the routed delta
    factors, report = approximate_factors(model, None, 32, cal, ridge=1e-10)
    assert report["relative_error"] < 1e-4
    a, b = factors["model.layers.0.mlp.down_proj"]
    torch.testing.assert_close(b @ a, target, atol=1e-3, rtol=0)


def test_chunked_statistics_give_the_same_factors_and_errors_are_clear():
    base = tiny_model("llama")
    model = make(base, "mtlora", block_type="both")
    f1, r1 = approximate_factors(model, None, 3, calibration())
    f2, r2 = approximate_factors(model, None, 3, calibration(), modules_per_pass=1)
    assert r1["relative_error"] == pytest.approx(r2["relative_error"], rel=1e-9)
    for name in f1:
        torch.testing.assert_close(f1[name][1] @ f1[name][0], f2[name][1] @ f2[name][0])
    with pytest.raises(mtpeft.MergeError, match="needs calibration batches"):
        approximate_factors(model, None, 3, None)
    no_ids = [{k: v for k, v in calibration()[0].items() if k != "task_ids"}]
    with pytest.raises(ValueError, match="needs task_ids in the calibration batches"):
        approximate_factors(model, "rte", 3, no_ids)
    with pytest.raises(mtpeft.MergeError, match="routes each token"):
        model.merge_and_unload()
