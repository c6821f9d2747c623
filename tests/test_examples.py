"""Every shipped run config validates: keys, method config and task presets."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import DATA_ROOT, REPO

import mtpeft
from mtpeft.runconfig import load_run_config
from mtpeft.train import resolve_task_specs

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


def test_shipped_accelerate_configs_load_in_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    folder = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
    configs = sorted(folder.glob("*.yaml"))
    assert {p.stem for p in configs} >= {"ddp", "multi_node"}
    for path in configs:
        cfg = load_config_from_file(str(path))
        assert str(cfg.distributed_type).endswith("MULTI_GPU"), path
        assert cfg.num_processes >= 2 and cfg.num_machines >= 1, path
