"""CI runs the throughput benchmark at toy size for correctness (never for time)."""

from __future__ import annotations

import importlib.util
import json
import math
import types

import pytest
import torch
from conftest import REPO


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("throughput", REPO / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_benchmark_smoke(tmp_path, throughput):
    assert throughput.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    rows = {r["label"]: r for r in data["rows"]}
    expected = {"base_floor", "base_floor_masked", "peft_lora", "mtpeft_lora", "mtpeft_mtl_lora",
                "peft_adapter_names_mixed", "mtpeft_mtl_lora_mixed"}
    assert expected <= set(rows)
    assert all(r["tokens_per_s"] > 0 for r in rows.values())
    assert rows["base_floor"]["trainable"] == 0 and rows["mtpeft_lora"]["trainable"] > 0
    # every row carries its ratio to its table's floor (and to PEFT), and they are the tokens/s ratios
    floors = {"train": "base_floor", "train_masked": "base_floor_masked", "inference": "merged_or_base"}
    peft = {"train": "peft_lora", "train_masked": "peft_lora_masked", "inference": "peft_adapter_names_mixed"}
    for r in rows.values():
        for key, ref in (("x_floor", floors), ("x_peft", peft)):
            assert math.isfinite(r[key]) and r[key] > 0, (r["label"], key)
            assert r[key] == pytest.approx(r["tokens_per_s"] / rows[ref[r["kind"]]]["tokens_per_s"], rel=1e-12)
    assert rows["base_floor"]["x_floor"] == 1 and rows["merged_or_base"]["x_floor"] == 1
    # a goal line for mtpeft LoRA against the floor (each table) and for every multi-task method against LoRA
    goals = {g["row"]: g for g in data["goals"]}
    assert goals["mtpeft_lora"]["against"] == "base_floor"
    assert goals["mtpeft_lora_masked"]["against"] == "base_floor_masked"
    assert goals["mtpeft_mtl_lora"]["against"] == "mtpeft_lora" and goals["mtpeft_mtl_lora"]["target"] == 0.85
    assert all(g["met"] == (g["ratio"] >= g["target"]) for g in goals.values())
    text = (tmp_path / "results.md").read_text()
    assert "| x floor | x PEFT |" in text and "## goals" in text and "mtpeft_mtl_lora: " in text


def test_frozen_floor_backpropagates_to_activations_without_weight_grads(throughput):
    args = types.SimpleNamespace(shape="smoke", device="cpu", dtype=torch.float64)
    model = throughput.base_model(args)
    floor = throughput.FrozenFloor(model, loss_chunk=7)  # chunks that do not divide the tokens
    grads = []

    def keep_grad(module, inputs, out):
        (out[0] if isinstance(out, tuple) else out).register_hook(grads.append)

    handle = model.model.layers[0].register_forward_hook(keep_grad)
    torch.manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (2, 12))
    labels = throughput.batch_labels(x, 0.5)
    loss = floor(input_ids=x, labels=labels).loss
    loss.backward()
    assert len(grads) == 1 and grads[0].abs().sum() > 0  # backward ran through the frozen layers
    assert all(p.grad is None for p in model.parameters())
    handle.remove()
    # the floor's loss head is the model's own loss, from the labelled positions only
    with torch.no_grad():
        assert loss.item() == pytest.approx(model(input_ids=x, labels=labels).loss.item(), rel=1e-10)


def test_rows_are_timed_interleaved_with_the_median_over_rounds(throughput, monkeypatch):
    """Warm-up row by row, then every round runs each row's steps in turn: load that changes during the run falls
    on every row alike. The reported step time is the median round."""
    calls = []
    clock = iter(range(1000))
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: float(next(clock)))
    rows = [{"label": name, "_step": (lambda name=name: calls.append(name)), "_tokens": 10, "_weights_gib": 0.0}
            for name in ("a", "b")]
    args = types.SimpleNamespace(device="cpu", warmup=1, repeats=3, steps=2)
    throughput.time_rows(rows, args)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3
    for row in rows:  # the fake clock ticks once per read: every round takes 1 "second" for 2 steps
        assert row["step_ms_rounds"] == [500.0] * 3 and row["tokens_per_s"] == 20.0
        assert not any(key.startswith("_") for key in row)


def test_ratios_per_round_are_paired(throughput):
    rows = [{"kind": "train", "label": "base_floor", "tokens_per_s": 10.0, "step_ms_rounds": [1.0, 2.0]},
            {"kind": "train", "label": "mtpeft_lora_compiled", "tokens_per_s": 5.0, "step_ms_rounds": [2.0, 3.0]}]
    throughput.add_ratios(rows)
    assert rows[1]["x_floor_rounds"] == pytest.approx([0.5, 2 / 3])
    assert "rounds 0.50-0.67" in throughput.goals(rows)[0]["text"]
    assert throughput.round_range(rows[1]["x_floor_rounds"]) == " (0.50-0.67)"
    assert throughput.round_range(rows[0]["x_floor_rounds"]) == ""  # the floor against itself
