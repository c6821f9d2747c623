"""Scale-out: 2 CPU processes (gloo, launched by torchrun) train exactly like 1 process on the same global batch,
under data parallelism, FSDP2 and DeepSpeed ZeRO-2/3, and checkpoints move between engines and process counts.

The 2-process runs are real launches of ``mtpeft train`` through ``torch.distributed.run``. FSDP2 goes through
``tests/accelerate_on_cpu.py``, which lifts accelerate's accelerator-only gate for FSDP and DeepSpeed (see there);
DeepSpeed runs on its own CPU accelerator.
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
from conftest import accelerate_launch_env, toy_run_config
from safetensors.torch import load_file

from mtpeft.core import distributed

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
OTHER_METHODS = {"ta_lora": {}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
# fp32 on CPU, as the 1-process reference; DeepSpeed on its CPU accelerator
CPU = {"ACCELERATE_MIXED_PRECISION": "no", "DS_ACCELERATOR": "cpu"}


def _engine_env(engine: str) -> dict[str, str]:
    """What ``accelerate launch`` with the shipped config of this engine sets (ddp: torchrun alone)."""
    if engine == "ddp":
        return {}
    config = {"fsdp": "fsdp.yaml", "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml"}[engine]
    env = {**accelerate_launch_env(EXAMPLES / config), **CPU}
    if engine == "zero3":
        # ZeRO-3 keeps parameters under 100k elements whole on every process: partition the tiny model's too
        env.pop("ACCELERATE_CONFIG_DS_FIELDS")
        env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(Path(__file__).resolve().parent / "zero3_partition_all.json")
    return env


CPU_ENGINE_LAUNCHER = str(Path(__file__).resolve().parent / "accelerate_on_cpu.py")


def _needs_engine(engine: str) -> None:
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (make setup installs it)")


def _env(engine: str = "ddp") -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MTPEFT_DEBUG="1", **_engine_env(engine))
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "src"), env.get("PYTHONPATH", "")])
    return env


def _write_config(folder: Path, model_dir: Path, method: str, **train) -> Path:
    cfg = toy_run_config(folder, model_dir, method, batch_size=7, steps=4, save_every=2, keep_checkpoints=10,
                         **train)
    cfg["method"].update({"dropout": 0.0, **{**METHODS, **OTHER_METHODS}[method]})
    # one prompt per generate call: predictions then do not depend on which prompts share a padded batch, so
    # a sharded evaluation must reproduce the single-process one exactly
    cfg["eval"].update({"batch_size": 1, "before_training": True})
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(config: Path, processes: int, *extra: str, engine: str = "ddp") -> subprocess.CompletedProcess:
    entry = ["-m", "mtpeft.cli"] if engine == "ddp" else [CPU_ENGINE_LAUNCHER]
    cli = [*entry, "train", str(config), "--quiet", *extra]
    if processes == 1:
        cmd = [sys.executable, *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               f"--master_port={_free_port()}", "--master_addr=127.0.0.1", *cli]
    proc = subprocess.run(cmd, env=_env(engine), capture_output=True, text=True, timeout=600)
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


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory, tiny_model_dir):
    """The 1-process reference run per method, made once and shared by the tests below."""
    runs: dict[str, tuple[Path, Path]] = {}

    def get(method: str) -> tuple[Path, Path]:
        if method not in runs:
            folder = tmp_path_factory.mktemp(f"one-{method}")
            config = _write_config(folder / "cfg", tiny_model_dir, method)
            _launch(config, 1, "--set", f"output_dir={folder / 'run'}")
            runs[method] = (config, folder / "run")
        return runs[method]
    return get


# Data parallelism for every method with distributed aux losses or calibration. The sharded engines for those
# too, above all the methods whose regularizers read parameters outside their layers' forward (mtLoRA's
# spectral term, ThanoRA's orthogonality), which FSDP2 hands out as DTensors and ZeRO-3 as empty partitions,
# and TA-LoRA's prompts.
CASES = [("ddp", method) for method in METHODS] + [
    ("fsdp", "align_lora"), ("fsdp", "mtlora"), ("fsdp", "thanora"), ("fsdp", "ta_lora"),
    ("zero2", "align_lora"), ("zero3", "mtlora"), ("zero3", "thanora")]
ENGINE_NAMES = {"ddp": "MULTI_CPU", "fsdp": "FSDP", "zero2": "DEEPSPEED (ZeRO-2)", "zero3": "DEEPSPEED (ZeRO-3)"}


@pytest.mark.parametrize(("engine", "method"), CASES)
def test_two_processes_train_like_one_on_the_same_global_batch(tmp_path, one_process_runs, engine, method):
    _needs_engine(engine)
    config, one = one_process_runs(method)
    two = tmp_path / "two"
    _launch(config, 2, "--set", f"output_dir={two}", engine=engine)
    losses_one, losses_two = _losses(one), _losses(two)
    assert sorted(losses_one) == [1, 2, 3, 4] == sorted(losses_two)
    if method in METHODS and method != "lora":  # the auxiliary losses are logged and non-trivial
        assert any(k.startswith("aux/") and abs(v) > 0 for k, v in losses_one[1].items())
    _assert_same_losses(losses_one, losses_two, range(1, 5))
    _assert_same_adapters(one, two)
    # evaluation before and after training, each process on its share (DDP) or all in lockstep (FSDP, ZeRO)
    assert (two / "eval" / "predictions.jsonl").read_text() == (one / "eval" / "predictions.jsonl").read_text()
    assert json.loads((two / "summary.json").read_text())["eval_before"] == \
        json.loads((one / "summary.json").read_text())["eval_before"]
    # written once: one checkpoint folder per save, one adapter, one summary
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    summary = json.loads((two / "summary.json").read_text())
    assert (summary["steps"], summary["processes"], summary["engine"]) == (4, 2, ENGINE_NAMES[engine])
    # checkpoints hold the whole optimizer state, whatever the engine: the 1-process run's tensors
    for step in ("step-0000002", "step-0000004"):
        mine = load_file(str(two / "checkpoints" / step / "optimizer.safetensors"))
        reference = load_file(str(one / "checkpoints" / step / "optimizer.safetensors"))
        assert mine.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(mine[key], reference[key], rtol=1e-3, atol=1e-6, msg=key)


def _as_if_killed_after_step_2(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    shutil.rmtree(target / "checkpoints" / "step-0000004")
    for name in ("adapter", "eval", "summary.json"):
        path = target / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return target


# its own group, so that xdist runs it beside the engine cases instead of after them (the suite's long pole)
@pytest.mark.xdist_group("distributed-resume")
@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero2", "zero3"])
def test_checkpoints_resume_across_engines_and_process_counts(tmp_path, one_process_runs, engine):
    """A 2-process checkpoint resumes on 1 process, and a 1-process checkpoint resumes on 2 under the engine."""
    _needs_engine(engine)
    config, one = one_process_runs("align_lora")
    two = tmp_path / "two"
    _launch(config, 2, "--set", f"output_dir={two}", engine=engine)
    for source, processes, run_engine in ((two, 1, "ddp"), (one, 2, engine)):
        resumed = _as_if_killed_after_step_2(source, tmp_path / f"resumed-on-{processes}")
        _launch(config, processes, "--set", f"output_dir={resumed}", "--resume", engine=run_engine)
        losses = _losses(resumed)
        assert sorted(losses) == [1, 2, 3, 4]
        _assert_same_losses(_losses(one), losses, range(1, 5))
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


def test_fsdp1_and_unknown_engines_are_refused_with_the_fix():
    from types import SimpleNamespace

    from mtpeft.training import engines

    fsdp1 = SimpleNamespace(distributed_type="DistributedType.FSDP", is_fsdp2=False)
    with pytest.raises(engines.EngineError, match="fsdp_version: 2"):
        engines.engine_of(fsdp1)
    with pytest.raises(engines.EngineError, match="XLA"):
        engines.engine_of(SimpleNamespace(distributed_type="DistributedType.XLA", is_fsdp2=False))
    assert engines.engine_of(SimpleNamespace(distributed_type="DistributedType.FSDP", is_fsdp2=True)).sharded
    assert not engines.engine_of(SimpleNamespace(distributed_type="DistributedType.MULTI_GPU", is_fsdp2=False)).sharded
    plain = torch.randn(2, 3)
    assert distributed.whole_tensor(plain) is plain
