"""Data parallelism: 2 CPU processes (gloo, launched by torchrun) train exactly like 1 process on the same
global batch, and a checkpoint from the 2-process run resumes on 1 process.

The 2-process runs are real launches of ``mtpeft train`` through ``torch.distributed.run``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import toy_run_config
from safetensors.torch import load_file

from mtpeft import distributed

pytestmark = pytest.mark.xdist_group("distributed")

# Per method: extra method options. Dropout 0 so that both runs see the same function.
METHODS = {
    "lora": {},
    "align_lora": {"align_weight": 0.5},
    "mtlora": {"num_experts": 2, "block_type": "ffn", "balance_weight": 0.1, "spectral_weight": 0.01,
               "spectral_every": 2},
    # its calibration runs on whole batches round robin and gathers the statistics
    "thanora": {"complexity": "activations", "block_init": "data"},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MTPEFT_DEBUG="1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "src"), env.get("PYTHONPATH", "")])
    return env


def _write_config(folder: Path, model_dir: Path, method: str, **train) -> Path:
    cfg = toy_run_config(folder, model_dir, method, batch_size=7, steps=4, save_every=2, keep_checkpoints=10,
                         **train)
    cfg["method"].update({"dropout": 0.0, **METHODS[method]})
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(config: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    cli = ["-m", "mtpeft.cli", "train", str(config), "--quiet", *extra]
    if processes == 1:
        cmd = [sys.executable, *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               f"--master_port={_free_port()}", "--master_addr=127.0.0.1", *cli]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _losses(run_dir: Path) -> dict[int, dict[str, float]]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = {k: v for k, v in record.items() if k == "loss" or k.startswith("aux/")}
    return out


def _assert_same_losses(one: dict, two: dict, steps) -> None:
    for step in steps:
        assert set(one[step]) == set(two[step])
        for key, value in one[step].items():
            assert two[step][key] == pytest.approx(value, rel=2e-4, abs=1e-6), (step, key, one[step], two[step])


def _assert_same_adapters(a: Path, b: Path) -> None:
    first = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    second = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_train_like_one_on_the_same_global_batch(tmp_path, tiny_model_dir, method):
    config = _write_config(tmp_path / "cfg", tiny_model_dir, method)
    one, two = tmp_path / "one", tmp_path / "two"
    _launch(config, 1, "--set", f"output_dir={one}")
    _launch(config, 2, "--set", f"output_dir={two}")
    losses_one, losses_two = _losses(one), _losses(two)
    assert sorted(losses_one) == [1, 2, 3, 4] == sorted(losses_two)
    if method != "lora":  # the auxiliary losses are logged and non-trivial
        assert any(k.startswith("aux/") and abs(v) > 0 for k, v in losses_one[1].items())
    _assert_same_losses(losses_one, losses_two, range(1, 5))
    _assert_same_adapters(one, two)
    # written once: one checkpoint folder per save, one adapter, one summary
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    assert json.loads((two / "summary.json").read_text())["steps"] == 4


def test_a_two_process_checkpoint_resumes_on_one_process(tmp_path, tiny_model_dir):
    config = _write_config(tmp_path / "cfg", tiny_model_dir, "align_lora")
    two, resumed, one = tmp_path / "two", tmp_path / "resumed", tmp_path / "one"
    _launch(config, 2, "--set", f"output_dir={two}")
    # the 2-process run as if it had been killed after its step-2 checkpoint
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-0000004")
    for name in ("adapter", "eval", "summary.json"):
        target = resumed / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    _launch(config, 1, "--set", f"output_dir={resumed}", "--resume")
    _launch(config, 1, "--set", f"output_dir={one}")
    losses = _losses(resumed)
    assert sorted(losses) == [1, 2, 3, 4]
    _assert_same_losses(_losses(one), losses, range(1, 5))
    _assert_same_losses(_losses(two), losses, range(3, 5))
    _assert_same_adapters(one, resumed)


# --- single-process behaviour of the helpers ---------------------------------------------------------------
def test_shard_batch_deals_every_task_round_robin_and_keeps_shards_balanced():
    batch = [(0, 0), (1, 5), (0, 1), (1, 6), (2, 9), (0, 2)]
    shards = [distributed.shard_batch(batch, r, 2) for r in range(2)]
    assert shards[0] == [(0, 0), (0, 2), (1, 6)] and shards[1] == [(0, 1), (1, 5), (2, 9)]
    assert sorted(shards[0] + shards[1]) == sorted(batch)
    assert distributed.shard_batch(batch, 0, 1) == batch
    with pytest.raises(ValueError, match="batch_size"):
        distributed.shard_batch(batch[:1], 0, 2)


def test_collectives_are_the_identity_in_one_process():
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.gather_rows(x) is x and distributed.all_reduce_sum(x) is x
    assert distributed.world_size() == 1 and distributed.rank() == 0
    assert distributed.split_round_robin([1, 2, 3], 0, 1) == [1, 2, 3]
    assert distributed.split_round_robin([1, 2, 3, 4, 5], 1, 2) == [2, 4]
