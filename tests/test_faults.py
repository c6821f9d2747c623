"""Fault injection: SIGKILL during training and inside checkpoint writes, failing writes, NaN, Ctrl-C.

Every scenario checks the same contract: a killed or failed run leaves only complete checkpoints
(``checkpoint_dirs`` never lists a partial one; leftovers are hidden dot-folders), the error says what
failed and where, and ``--resume`` ends with exactly the adapter of an uninterrupted run (CPU, fp32).

Kill points are injected deterministically: a subprocess (:data:`KILL_SCRIPT`) patches one function to
SIGKILL its own process at a chosen step / file, after leaving a torn file behind where that is the
point. Steps are drawn with a fixed seed so that the suite is reproducible; the test ids show them.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import REPO, toy_run_config
from safetensors.torch import load_file

import mtpeft.training.checkpoint as checkpoint_mod
import mtpeft.training.trainer as train_mod
from mtpeft.io.adapter import WEIGHTS_NAME
from mtpeft.training.checkpoint import checkpoint_dirs
from mtpeft.training.run_config import run_config_from_dict
from mtpeft.training.trainer import STEP_DELAY_ENV, MultiTaskTrainer, TrainingError, train

pytestmark = pytest.mark.xdist_group("faults")

STEPS = 8  # save_every=2 (toy_run_config): checkpoints at steps 2, 4, 6 and the final one at 8
SAVE_STEPS = (2, 4, 6)
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_RNG = random.Random(20240611)  # seeded choice of the kill steps (shown in the test ids)

# Points inside one checkpoint write, in the order save_checkpoint reaches them.
WRITE_POINTS = ["adapter_weights", "adapter_config", "adapter_publish", "optimizer", "rng", "trainer_state",
                "publish"]
WRITE_FAULTS = [(point, _RNG.choice(SAVE_STEPS)) for point in WRITE_POINTS]
# Points inside a training step (no checkpoint being written): the n-th call of the patched function.
TRAIN_POINTS = ["batch_draw", "backward", "optimizer_step", "metrics_log"]
TRAIN_FAULTS = [(point, _RNG.randint(1, STEPS - 1)) for point in TRAIN_POINTS]

KILL_SCRIPT = r'''
"""Train a run config and SIGKILL this process at one injected point (used by tests/test_faults.py)."""
import os
import signal
import sys
from pathlib import Path

cfg_file, point, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
step_tmp = f".step-{n:07d}.tmp-"


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def tear(path):
    """Leave half of the file on disk, as a write cut short would."""
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)


import accelerate  # noqa: E402
import torch  # noqa: E402

import mtpeft.data.mixing as mixing  # noqa: E402
import mtpeft.io.adapter as model_mod  # noqa: E402
import mtpeft.training.checkpoint as checkpoint_mod  # noqa: E402
import mtpeft.training.trainer as train_mod  # noqa: E402
from mtpeft.training.run_config import load_run_config  # noqa: E402

files = {"adapter_weights": (model_mod, "adapter_model.safetensors"),
         "final_adapter": (model_mod, "adapter_model.safetensors"),
         "optimizer": (checkpoint_mod, "optimizer.safetensors"), "rng": (checkpoint_mod, "rng.safetensors")}
if point in files:
    module, name = files[point]
    real_save = module.save_file

    def save_file(tensors, filename, *args, **kwargs):
        real_save(tensors, filename, *args, **kwargs)
        if Path(filename).name == name:
            final = point == "final_adapter" and "/checkpoints/" not in str(filename)
            if final or (point != "final_adapter" and step_tmp in str(filename)):
                tear(filename)
                die()

    module.save_file = save_file
elif point in ("adapter_config", "trainer_state"):
    name = {"adapter_config": "mtpeft_config.json", "trainer_state": "trainer_state.json"}[point]
    real_write_text = Path.write_text

    def write_text(self, data, *args, **kwargs):
        if self.name == name and step_tmp in str(self):
            real_write_text(self, data[: len(data) // 2], *args, **kwargs)
            die()
        return real_write_text(self, data, *args, **kwargs)

    Path.write_text = write_text
elif point in ("adapter_publish", "publish"):
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        src_name = Path(src).name
        if point == "publish" and src_name.startswith(step_tmp):
            die()
        if point == "adapter_publish" and step_tmp in str(src) and src_name.startswith(".adapter.tmp-"):
            die()
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace
else:
    calls = {"n": 0}

    def counted(real, before):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if before and calls["n"] == n:
                die()
            out = real(*args, **kwargs)
            if not before and calls["n"] == n:
                die()
            return out
        return wrapper

    if point == "batch_draw":
        mixing.MixtureSampler.next_batch = counted(mixing.MixtureSampler.next_batch, before=True)
    elif point == "backward":
        accelerate.Accelerator.backward = counted(accelerate.Accelerator.backward, before=True)
    elif point == "optimizer_step":  # after the update, before the scheduler step and the step count
        torch.optim.AdamW.step = counted(torch.optim.AdamW.step, before=False)
    elif point == "metrics_log":  # a torn metrics line
        real_log = train_mod.MultiTaskTrainer._log

        def log(path, record):
            if record.get("step") == n and "loss" in record:
                with open(path, "a", encoding="utf-8") as fh:
                    fh.write('{"step": %d, "loss": 0.' % n)
                die()
            real_log(path, record)

        train_mod.MultiTaskTrainer._log = staticmethod(log)
    else:
        raise SystemExit(f"unknown kill point {point}")

train_mod.train(load_run_config(cfg_file), progress=False)
print("COMPLETED")
'''


# --- helpers ----------------------------------------------------------------------------------------
def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / WEIGHTS_NAME))


def _losses(run: Path) -> dict[int, float]:
    """Logged loss per step (metrics.jsonl)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _assert_same_adapter(ref: dict[str, torch.Tensor], run: Path) -> None:
    got = _adapter(run)
    assert got.keys() == ref.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), key


def _assert_complete(ckpt: Path) -> int:
    """A listed checkpoint is whole: every file is there and loads; returns its step."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    for name in ("optimizer.safetensors", "rng.safetensors", f"adapter/{WEIGHTS_NAME}"):
        load_file(str(ckpt / name))
    json.loads((ckpt / "adapter" / "mtpeft_config.json").read_text())
    assert ckpt.name == f"step-{state['step']:07d}"
    return int(state["step"])


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


def _config(folder: Path, model_dir: Path, **train: Any) -> dict[str, Any]:
    """The toy run (8 steps, checkpoints every 2) without the final evaluation (not under test here)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = toy_run_config(folder, model_dir, **{"steps": STEPS, **train})
    cfg["data"]["max_eval_per_task"] = 0
    return cfg


def _resume_and_check(cfg: dict[str, Any], reference: dict[str, Any]) -> None:
    """Resume the run in-process; it must end with the reference adapter and the reference loss curve."""
    result = train(run_config_from_dict(cfg), resume=True, progress=False)
    run = Path(cfg["output_dir"])
    assert result.steps == STEPS
    _assert_same_adapter(reference["adapter"], run)
    assert _losses(run) == reference["losses"]  # every step logged once, with the uninterrupted loss
    for ckpt in checkpoint_dirs(run):
        _assert_complete(ckpt)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread here and in the subprocesses (ONE_THREAD): identical numerics everywhere, and
    no thread oversubscription on a loaded machine (8 tiny steps: ~1 s instead of ~15 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir) -> dict[str, Any]:
    """The uninterrupted run every faulted run must reproduce after resuming."""
    cfg = _config(tmp_path_factory.mktemp("reference"), tiny_model_dir)
    train(run_config_from_dict(cfg), progress=False)
    run = Path(cfg["output_dir"])
    return {"adapter": _adapter(run), "losses": _losses(run)}


def _kill_run(tmp_path: Path, model_dir: Path, point: str, n: int) -> tuple[dict[str, Any], Path]:
    """Run the kill script on a fresh run folder; asserts it died by SIGKILL."""
    cfg = _config(tmp_path, model_dir)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    script = tmp_path / "kill_run.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(cfg_file), point, str(n)], cwd=REPO,
                          env={**os.environ, **ONE_THREAD}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {point}/{n}:\n{proc.stdout}\n{proc.stderr}"
    return cfg, Path(cfg["output_dir"])


# --- SIGKILL ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("point", "step"), WRITE_FAULTS, ids=[f"{p}-step{s}" for p, s in WRITE_FAULTS])
def test_sigkill_inside_a_checkpoint_write_is_never_picked_up(tmp_path, tiny_model_dir, reference, point,
                                                               step):
    cfg, run = _kill_run(tmp_path, tiny_model_dir, point, step)
    ckpt_root = run / "checkpoints"
    listed = checkpoint_dirs(run)
    assert [_assert_complete(c) for c in listed] == [s for s in SAVE_STEPS if s < step][-2:]  # keep=2
    leftovers = _hidden(ckpt_root)
    assert any(name.startswith(f".step-{step:07d}.tmp-") for name in leftovers), leftovers
    assert not (ckpt_root / f"step-{step:07d}").exists()
    assert not (run / "adapter").exists()
    _resume_and_check(cfg, reference)


def test_sigkill_inside_the_final_adapter_write(tmp_path, tiny_model_dir, reference):
    cfg, run = _kill_run(tmp_path, tiny_model_dir, "final_adapter", 0)
    assert [_assert_complete(c) for c in checkpoint_dirs(run)] == [6, 8]
    assert not (run / "adapter").exists()
    assert any(name.startswith(".adapter.tmp-") for name in _hidden(run))
    _resume_and_check(cfg, reference)


@pytest.mark.parametrize(("point", "call"), TRAIN_FAULTS, ids=[f"{p}-call{c}" for p, c in TRAIN_FAULTS])
def test_sigkill_inside_a_training_step(tmp_path, tiny_model_dir, reference, point, call):
    cfg, run = _kill_run(tmp_path, tiny_model_dir, point, call)
    for ckpt in checkpoint_dirs(run):
        assert _assert_complete(ckpt) <= call
    assert not (run / "adapter").exists()
    _resume_and_check(cfg, reference)


def _cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    # The child starts with Ctrl-C at its default, as from a terminal: a disposition of SIGINT that something
    # else in the test process set (an ignored SIGINT is inherited across exec) must not decide the test.
    return subprocess.Popen([sys.executable, "-m", "mtpeft.cli", *args], cwd=REPO,
                            env={**os.environ, **ONE_THREAD, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 240) -> None:
    """Wait until metrics.jsonl logs ``step`` (the run is inside its training loop)."""
    log = run / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training ended before the signal:\n{proc.stdout.read()}")
        lines = log.read_text().splitlines() if log.is_file() else []
        if any(line.startswith(f'{{"step": {step},') for line in lines):
            return
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"step {step} was not logged within {timeout} s")


def test_sigkill_at_a_random_time_from_outside(tmp_path, tiny_model_dir, reference):
    """An external SIGKILL at a seeded-random moment (wherever it lands: a step, a log line, a write)."""
    cfg = _config(tmp_path, tiny_model_dir)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    run = Path(cfg["output_dir"])
    proc = _cli(["train", str(cfg_file), "--quiet"], env={STEP_DELAY_ENV: "0.3"})
    _wait_for_step(proc, run, 1)
    time.sleep(random.Random(7).uniform(0.0, 1.2))  # steps take >= 0.3 s: lands within steps 1-5
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    for ckpt in checkpoint_dirs(run):
        _assert_complete(ckpt)
    _resume_and_check(cfg, reference)


# --- Ctrl-C -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("after_step", [random.Random(11).randint(1, 5)])
def test_ctrl_c_stops_cleanly_with_a_final_checkpoint(tmp_path, tiny_model_dir, reference, after_step):
    cfg = _config(tmp_path, tiny_model_dir)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    run = Path(cfg["output_dir"])
    proc = _cli(["train", str(cfg_file), "--quiet"], env={STEP_DELAY_ENV: "0.3"})
    _wait_for_step(proc, run, after_step)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    # 128 + SIGINT: `error: interrupted at step N; checkpoint saved ...`
    assert proc.returncode == 130, f"{out}\n(SIGINT in the test process: {signal.getsignal(signal.SIGINT)})"
    assert "Traceback" not in out, out
    assert "interrupted at step" in out, out
    stopped = int(out.split("interrupted at step", 1)[1].split(";", 1)[0])
    assert stopped >= after_step
    listed = checkpoint_dirs(run)
    assert listed and _assert_complete(listed[-1]) == stopped
    assert _hidden(run / "checkpoints") == []  # a clean stop leaves no temp folders
    _resume_and_check(cfg, reference)


# --- failing writes ---------------------------------------------------------------------------------
def _enospc(path: Any) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _eacces(path: Any) -> PermissionError:
    return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))


def _read_only(monkeypatch, folder: Path) -> None:
    """Make ``folder`` read-only: chmod where that binds (not root), else the errors it would cause."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return
    import tempfile

    real_mkdtemp, real_replace = tempfile.mkdtemp, os.replace

    def mkdtemp(*args, **kwargs):
        if Path(kwargs.get("dir") or ".").resolve() == folder.resolve():
            raise _eacces(folder)
        return real_mkdtemp(*args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        if Path(dst).parent.resolve() == folder.resolve():
            raise _eacces(dst)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("fault", ["enospc_optimizer", "enospc_adapter", "enospc_trainer_state", "read_only",
                                   "eacces_publish"])
def test_a_failing_checkpoint_write_names_the_path_and_keeps_the_last_good_one(tmp_path, tiny_model_dir,
                                                                               reference, monkeypatch, fault):
    import mtpeft.io.adapter as model_mod

    cfg = _config(tmp_path, tiny_model_dir)
    run = Path(cfg["output_dir"])
    marker = ".step-0000004.tmp-"
    real_save_checkpoint = train_mod.save_checkpoint
    undo = []

    if fault in ("enospc_optimizer", "enospc_adapter"):
        module = checkpoint_mod if fault == "enospc_optimizer" else model_mod
        real = module.save_file

        def save_file(tensors, filename, *args, **kwargs):
            if marker in str(filename):
                Path(filename).write_bytes(b"\0" * 16)  # the disk filled up mid-file
                raise _enospc(filename)
            return real(tensors, filename, *args, **kwargs)

        monkeypatch.setattr(module, "save_file", save_file)
    elif fault == "enospc_trainer_state":
        real_write_text = Path.write_text

        def write_text(self, data, *args, **kwargs):
            if self.name == "trainer_state.json" and marker in str(self):
                raise _enospc(self)
            return real_write_text(self, data, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)
    elif fault == "eacces_publish":
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if Path(src).name.startswith(marker):
                raise _eacces(dst)
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)
    else:  # the checkpoints folder turns read-only after step 2's checkpoint

        def save_checkpoint(output_dir, step, *args, **kwargs):
            if step == 4:
                _read_only(monkeypatch, run / "checkpoints")
                undo.append(lambda: (run / "checkpoints").chmod(0o755))
            return real_save_checkpoint(output_dir, step, *args, **kwargs)

        monkeypatch.setattr(train_mod, "save_checkpoint", save_checkpoint)

    try:
        with pytest.raises(TrainingError) as info:
            train(run_config_from_dict(cfg), progress=False)
    finally:
        for fn in undo:
            fn()
    monkeypatch.undo()
    message = str(info.value)
    assert f"could not write checkpoint {run / 'checkpoints' / 'step-0000004'}" in message, message
    reason = "No space left on device" if fault.startswith("enospc") else "Permission denied"
    assert reason in message, message
    assert f"last good checkpoint ({run / 'checkpoints' / 'step-0000002'}) is intact" in message, message
    assert [_assert_complete(c) for c in checkpoint_dirs(run)] == [2]
    assert _hidden(run / "checkpoints") == []  # the failed write cleaned up after itself
    assert not (run / "adapter").exists()
    _resume_and_check(cfg, reference)


def test_a_failing_final_adapter_write_is_a_training_error(tmp_path, tiny_model_dir, reference, monkeypatch):
    import mtpeft.io.adapter as model_mod

    cfg = _config(tmp_path, tiny_model_dir)
    run = Path(cfg["output_dir"])
    real = model_mod.save_file

    def save_file(tensors, filename, *args, **kwargs):
        if "/checkpoints/" not in str(filename):
            raise _enospc(filename)
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(model_mod, "save_file", save_file)
    with pytest.raises(TrainingError, match=r"could not write the adapter .*: .*No space left on device"):
        train(run_config_from_dict(cfg), progress=False)
    monkeypatch.undo()
    assert [_assert_complete(c) for c in checkpoint_dirs(run)] == [6, 8]
    assert not (run / "adapter").exists() and _hidden(run) == []
    _resume_and_check(cfg, reference)


def test_a_failing_metrics_log_write_is_a_training_error(tmp_path, tiny_model_dir, reference, monkeypatch):
    cfg = _config(tmp_path, tiny_model_dir)
    run = Path(cfg["output_dir"])
    real_open = open

    def fake_open(file, mode="r", *args, **kwargs):
        late = (run / "checkpoints" / "step-0000002").exists()  # from step 3 on
        if Path(file).name == "metrics.jsonl" and "a" in mode and late:
            raise _enospc(file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(train_mod, "open", fake_open, raising=False)
    with pytest.raises(TrainingError, match=r"could not write .*metrics\.jsonl.*No space left on device"):
        train(run_config_from_dict(cfg), progress=False)
    monkeypatch.undo()
    assert [_assert_complete(c) for c in checkpoint_dirs(run)] == [2]
    _resume_and_check(cfg, reference)


# --- NaN / inf ----------------------------------------------------------------------------------------
def test_nan_in_an_auxiliary_loss_stops_the_run(tmp_path, tiny_model_dir):
    cfg = run_config_from_dict(_config(tmp_path, tiny_model_dir, steps=6) | {"method": {
        "method": "align_lora", "r": 4, "alpha": 8}})
    trainer = MultiTaskTrainer(cfg, progress=False)
    spec = trainer.model.method
    calls = {"n": 0}

    def poisoned(model):
        out = spec.aux_losses(model)
        calls["n"] += 1
        if calls["n"] == 3:
            name, (value, weight) = next(iter(out.items()))
            assert weight > 0
            out[name] = (value * float("nan"), weight)
        return out

    trainer.model.method = dataclasses.replace(spec, aux_losses=poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 3"):
        trainer.train()
    ckpts = checkpoint_dirs(cfg.output_dir)
    assert [_assert_complete(c) for c in ckpts] == [2]
    for value in load_file(str(ckpts[-1] / "adapter" / WEIGHTS_NAME)).values():
        assert torch.isfinite(value).all()
    assert not (Path(cfg.output_dir) / "adapter").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_save_pretrained_refuses_a_non_finite_adapter(tmp_path, bad):
    from conftest import tiny_model

    import mtpeft

    model = mtpeft.get_mt_model(tiny_model(), mtpeft.LoRAConfig(r=4))
    target = tmp_path / "adapter"
    model.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    name, param = model.trainable_parameters()[3]
    with torch.no_grad():
        param.view(-1)[1] = bad
    with pytest.raises(ValueError, match="refusing to save a non-finite adapter: .*has NaN or inf"):
        model.save_pretrained(target)
    with pytest.raises(ValueError, match="non-finite"):
        model.save_pretrained(tmp_path / "fresh")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the good adapter is untouched
    assert not (tmp_path / "fresh").exists() and _hidden(tmp_path) == []


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_inf_gradients_with_a_finite_loss_never_reach_a_checkpoint(tmp_path, tiny_model_dir, policy):
    """Gradient overflow at a save step: the weights would turn NaN; the run stops (never hangs or saves)."""
    cfg = run_config_from_dict(_config(tmp_path, tiny_model_dir, steps=6, nan_policy=policy))
    trainer = MultiTaskTrainer(cfg, progress=False)
    _, param = trainer.model.trainable_parameters()[0]
    calls = {"n": 0}

    def overflow(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] >= 2 else grad  # from step 2 on, every step

    param.register_hook(overflow)
    with pytest.raises(TrainingError, match="non-finite"):
        trainer.train()
    for ckpt in checkpoint_dirs(cfg.output_dir):
        for value in load_file(str(ckpt / "adapter" / WEIGHTS_NAME)).values():
            assert torch.isfinite(value).all()
    assert not (Path(cfg.output_dir) / "adapter").exists()
