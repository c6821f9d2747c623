"""The packing benchmark at toy size, for correctness (never for time): the demo and BBH mixtures through the real
SmolLM2 tokenizer, a tiny random model, and a results table whose fields agree with each other."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics

import pytest
import torch
from conftest import DATA_ROOT, REPO


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("packing_bench", REPO / "benchmarks" / "packing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_packing_benchmark_smoke(tmp_path, bench, smollm2_dir) -> None:
    if not (DATA_ROOT / "bbh" / "bbh" / "navigate.json").is_file():
        pytest.skip(f"no BBH data under {DATA_ROOT}")
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--smoke", "--threads", "1", "--data-root", str(DATA_ROOT), "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "results.json").read_text())
    results = {r["mixture"]: r for r in data["mixtures"]}
    assert set(results) == {"demo", "bbh27"}
    assert results["demo"]["tasks"] == 4 and results["bbh27"]["tasks"] == 27
    assert results["bbh27"]["max_length"] == 512
    for res in results.values():
        layouts = res["layouts"]
        assert list(layouts) == ["padded", "packed", "packed_filled"]
        for name, e in layouts.items():
            for key in ("useful_tokens_per_s", "step_ms", "x_padded", "rows", "width", "cells_per_step",
                        "useful_tokens_per_step"):
                assert math.isfinite(e[key]) and e[key] > 0, (res["mixture"], name, key)
            assert len(e["useful_tokens_per_s_repeats"]) == 2 and len(e["shapes"]) == 2  # --smoke: 2 x 2 steps
            assert 0 <= e["padding_fraction"] < 1
            cells = sum(r * w for r, w in e["shapes"])
            assert e["padding_fraction"] == pytest.approx(1 - e["useful_tokens"] / cells, rel=1e-12)
            assert all(w <= res["max_length"] for _, w in e["shapes"])
            rates = [e["useful_tokens"] / s for s in e["seconds"]]
            assert e["useful_tokens_per_s_repeats"] == pytest.approx(rates, rel=1e-12)
            assert e["useful_tokens_per_s"] == pytest.approx(statistics.median(rates), rel=1e-12)
        padded, packed, filled = layouts["padded"], layouts["packed"], layouts["packed_filled"]
        # the same examples per step: the same useful tokens, in fewer rows, and padding that only shrinks rows
        assert packed["batch_size"] == padded["batch_size"] and packed["useful_tokens"] == padded["useful_tokens"]
        assert packed["rows"] < padded["rows"]
        assert filled["batch_size"] >= padded["batch_size"]
        assert padded["x_padded"] == 1
        ratios = [p / b for p, b in zip(packed["useful_tokens_per_s_repeats"], padded["useful_tokens_per_s_repeats"])]
        assert res["goal"]["ratio"] == packed["x_padded"] == pytest.approx(statistics.median(ratios), rel=1e-12)
        assert res["goal"]["target"] == 2.0 and res["goal"]["met"] == (res["goal"]["ratio"] >= 2.0)
        assert res["goal"]["tokens_ratio"] == pytest.approx(padded["cells_per_step"] / packed["cells_per_step"])
        bound = padded["cells_per_step"] / padded["useful_tokens_per_step"]
        assert res["goal"]["no_padding_bound"] == pytest.approx(bound)
    # BBH pads most of its padded batch (lengths 20 to 500 tokens); packing removes most of that padding, and the
    # filled layout holds about as many tokens per step as the padded one
    bbh = results["bbh27"]["layouts"]
    assert bbh["padded"]["padding_fraction"] > 0.3 > bbh["packed"]["padding_fraction"]
    assert bbh["packed_filled"]["cells_per_step"] == pytest.approx(bbh["padded"]["cells_per_step"], rel=0.25)
    text = (tmp_path / "results.md").read_text()
    assert "| layout | batch size | rows x width |" in text and "## bbh27 (27 tasks" in text
    assert "bbh27: packed / padded = " in text and "goal >= 2x" in text
