"""A bench process trains many runs: with ``train.compile`` each run starts from a fresh dynamo cache."""

from __future__ import annotations

import pytest
import torch
from conftest import toy_run_config

from mtpeft.bench import method_run
from mtpeft.bench.options import BenchOptions


class Stop(Exception):
    pass


@pytest.mark.parametrize("compile_on", [True, False])
def test_compiled_bench_runs_reset_dynamo_first(tmp_path, tiny_model_dir, monkeypatch, compile_on):
    """dynamo keeps at most 8 graphs per code object, and every run's decoder shares one: without the reset the
    later runs of a bench would silently train eager."""
    events = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: events.append("reset"))

    def trainer(cfg, **kwargs):  # noqa: ANN001, ANN003, ANN202
        events.append("trainer")
        raise Stop

    monkeypatch.setattr("mtpeft.training.trainer.MultiTaskTrainer", trainer)
    config = toy_run_config(tmp_path, tiny_model_dir, steps=1, compile=compile_on)
    with pytest.raises(Stop):
        method_run.train_method(config, "lora", [], BenchOptions())
    assert events == (["reset", "trainer"] if compile_on else ["trainer"])
