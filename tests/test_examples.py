"""Every shipped run config validates: keys, method config and task presets."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import DATA_ROOT, REPO, accelerate_launch_env

import mtpeft
from mtpeft.data.resolve import resolve_task_specs
from mtpeft.training.run_config import load_run_config, run_config_from_dict

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def test_there_is_an_example_for_every_method():
    methods = {load_run_config(p).method["method"] for p in EXAMPLES}
    assert set(mtpeft.available_methods()) <= methods


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_is_valid(path: Path):
    cfg = load_run_config(path)
    if not (DATA_ROOT / "bbh").is_dir() and cfg.tasks != ["demo"]:
        pytest.skip(f"shared data not found at {DATA_ROOT}: task presets not resolved")
    specs = resolve_task_specs(cfg)
    assert specs and len({s.name for s in specs}) == len(specs)
    names = [s.name for s in specs]
    mtpeft.config_from_dict({**cfg.method, "tasks": names})
    for spec in specs:
        if not spec.source.startswith("builtin:"):
            assert Path(spec.source).is_file() or (DATA_ROOT / spec.source).is_file(), spec.source


def test_shipped_accelerate_configs_give_the_engines_mtpeft_supports():
    """Each shipped config, through accelerate's own launcher code, selects the engine its name promises (the
    FSDP and DeepSpeed ones are what tests/test_distributed.py trains with)."""
    folder = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
    configs = {p.stem: p for p in folder.glob("*.yaml")}
    assert set(configs) >= {"ddp", "multi_node", "fsdp", "deepspeed_zero2", "deepspeed_zero3"}
    for name, path in configs.items():
        env = accelerate_launch_env(path)
        if name == "fsdp":
            assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2", env
        elif name.startswith("deepspeed_zero"):
            assert env["ACCELERATE_USE_DEEPSPEED"] == "true", env
            assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == name[-1], env
        else:  # data parallelism
            assert "ACCELERATE_USE_FSDP" not in env and "ACCELERATE_USE_DEEPSPEED" not in env, env


@pytest.mark.parametrize("gpu", [False, True])
def test_the_demo_config_is_valid_for_every_method(monkeypatch, gpu):
    """`mtpeft demo --method M` must at least configure every registered method (CPU and GPU variants)."""
    from mtpeft.training import demo

    monkeypatch.setattr(demo.torch.cuda, "is_available", lambda: gpu)
    for method in mtpeft.available_methods():
        cfg = run_config_from_dict(demo.demo_config(method))
        mtpeft.config_from_dict({**cfg.method, "tasks": ["arithmetic", "reverse", "extract", "category"]})
