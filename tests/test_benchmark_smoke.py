"""CI runs the throughput benchmark at toy size for correctness (never for time)."""

from __future__ import annotations

import importlib.util
import json

from conftest import REPO


def test_throughput_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("throughput", REPO / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    labels = {r["label"] for r in data["rows"]}
    expected = {"peft_lora", "mtpeft_lora", "mtpeft_mtl_lora", "peft_adapter_names_mixed", "mtpeft_mtl_lora_mixed"}
    assert expected <= labels
    assert all(r["tokens_per_s"] > 0 for r in data["rows"])
    assert "x PEFT" in (tmp_path / "results.md").read_text()
