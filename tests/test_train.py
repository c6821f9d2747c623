"""End-to-end training on a tiny model: checkpoints, exact resume (also after SIGKILL), errors, NaN policy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, toy_run_config
from safetensors.torch import load_file

from mtpeft.training.checkpoint import checkpoint_dirs
from mtpeft.training.run_config import RunConfigError, load_run_config, run_config_from_dict
from mtpeft.training.trainer import STEP_DELAY_ENV, TrainingError, train

pytestmark = pytest.mark.xdist_group("train")


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_train_writes_adapter_metrics_checkpoints_and_table(tmp_path, tiny_model_dir):
    cfg = run_config_from_dict(toy_run_config(tmp_path, tiny_model_dir, method="mtl_lora"))
    result = train(cfg, progress=False)
    run = Path(cfg.output_dir)
    assert result.steps == 6 and result.final_loss is not None
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert all("tokens_per_s" in x and "loss" in x for x in lines)
    assert [p.name for p in checkpoint_dirs(run)] == ["step-0000004", "step-0000006"]  # keep_checkpoints=2
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"copy", "parity"}
    assert (run / "eval" / "predictions.jsonl").is_file() and (run / "eval" / "metrics.md").is_file()
    assert "copy" in result.eval.format_table()
    # the adapter changed from its initialization (B started at zero)
    assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in _adapter(run).items())


@pytest.mark.parametrize("method", ["lora", "align_lora"])
def test_resume_equals_uninterrupted_run_exactly(tmp_path, tiny_model_dir, method):
    full = run_config_from_dict(toy_run_config(tmp_path / "a", tiny_model_dir, method=method))
    train(full, progress=False)
    # The interrupted run: Ctrl-C arrives while step 5 draws its batch, after checkpoint 4 was written.
    part = toy_run_config(tmp_path / "b", tiny_model_dir, method=method)
    from mtpeft.training.trainer import MultiTaskTrainer

    trainer = MultiTaskTrainer(run_config_from_dict(part), progress=False)
    draw = trainer.sampler.next_batch
    calls = {"n": 0}

    def next_batch():
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return draw()

    trainer.sampler.next_batch = next_batch
    with pytest.raises(TrainingError, match="interrupted at step 4"):
        trainer.train()
    resumed = train(run_config_from_dict(part), resume=True, progress=False)
    assert resumed.steps == 6
    a, b = _adapter(Path(full.output_dir)), _adapter(Path(part["output_dir"]))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(x)["step"] for x in (Path(part["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def _run_cli(args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "mtpeft.cli", *args], cwd=REPO, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_sigkill_mid_training_then_resume_gives_the_uninterrupted_adapter(tmp_path, tiny_model_dir):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ref_cfg = toy_run_config(tmp_path / "a", tiny_model_dir, steps=8)
    train(run_config_from_dict(ref_cfg), progress=False)
    kill_cfg = toy_run_config(tmp_path / "b", tiny_model_dir, steps=8)
    cfg_file = tmp_path / "b" / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(kill_cfg))
    proc = _run_cli(["train", str(cfg_file), "--quiet"], env={STEP_DELAY_ENV: "0.5"})
    run = Path(kill_cfg["output_dir"])
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name == "step-0000004" for p in checkpoint_dirs(run)):
        if proc.poll() is not None:
            pytest.fail(f"training ended before it could be killed:\n{proc.stdout.read()}")
        time.sleep(0.05)
    time.sleep(0.7)  # somewhere inside step 5 or 6
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "adapter").exists()
    done = _run_cli(["train", str(cfg_file), "--resume", "--quiet"])
    out, _ = done.communicate(timeout=300)
    assert done.returncode == 0, out
    a, b = _adapter(Path(ref_cfg["output_dir"])), _adapter(run)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _poisoned_trainer(cfg, monkeypatch, at_call: int, factor: float):
    """A Trainer whose model's ``at_call``-th forward returns its loss times ``factor`` (nan or inf)."""
    from mtpeft.training.trainer import MultiTaskTrainer

    trainer = MultiTaskTrainer(cfg, progress=False)
    forward = trainer.model.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == at_call:
            out["loss"] = out.loss * factor
        return out

    monkeypatch.setattr(trainer.model, "forward", poisoned)
    return trainer


def test_nan_loss_stops_with_step_and_tasks_and_keeps_last_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    cfg = run_config_from_dict(toy_run_config(tmp_path, tiny_model_dir))
    trainer = _poisoned_trainer(cfg, monkeypatch, at_call=3, factor=float("nan"))
    expected = r"non-finite loss \(nan\) at step 3.*tasks in the batch: \[.*'(copy|parity)'"
    with pytest.raises(TrainingError, match=expected):
        trainer.train()
    ckpts = checkpoint_dirs(cfg.output_dir)
    assert [p.name for p in ckpts] == ["step-0000002"]
    for value in load_file(str(ckpts[-1] / "adapter" / "adapter_model.safetensors")).values():
        assert torch.isfinite(value).all()


def test_nan_policy_skip_drops_the_batch(tmp_path, tiny_model_dir, monkeypatch):
    cfg = run_config_from_dict(toy_run_config(tmp_path, tiny_model_dir, nan_policy="skip"))
    trainer = _poisoned_trainer(cfg, monkeypatch, at_call=2, factor=float("inf"))
    result = trainer.train()
    assert result.skipped_batches == 1 and result.steps == 6
    for value in _adapter(Path(cfg.output_dir)).values():
        assert torch.isfinite(value).all()


def test_refuses_to_overwrite_a_run_without_resume(tmp_path, tiny_model_dir):
    cfg = run_config_from_dict(toy_run_config(tmp_path, tiny_model_dir, steps=2))
    train(cfg, progress=False)
    with pytest.raises(TrainingError, match="--resume"):
        train(cfg, progress=False)


def test_bad_config_key_and_value_are_named(tmp_path):
    with pytest.raises(RunConfigError, match=r"unknown key train\.learning_rate; allowed keys in train: \[.*'lr'"):
        run_config_from_dict({"tasks": ["demo"], "train": {"learning_rate": 1}})
    with pytest.raises(RunConfigError, match=r"train\.schedule must be one of \['cosine', 'linear', 'constant'\]"):
        run_config_from_dict({"tasks": ["demo"], "train": {"schedule": "exp"}})
    with pytest.raises(RunConfigError, match=r"train\.lr must be of type float, got str"):
        run_config_from_dict({"tasks": ["demo"], "train": {"lr": "fast"}})
    with pytest.raises(RunConfigError, match=r"method: unknown key\(s\) \['rank'\]"):
        run_config_from_dict({"tasks": ["demo"], "method": {"method": "lora", "rank": 4}})
    path = tmp_path / "r.yaml"
    path.write_text("tasks: [demo]\ntrain:\n  steps: 5\n")
    cfg = load_run_config(path, ["train.steps=7", "method.method=thanora", "method.r=12", "train.lr=1e-3"])
    assert cfg.train.steps == 7 and cfg.method == {"method": "thanora", "r": 12}
    assert cfg.train.lr == 1e-3  # YAML 1.1 reads 1e-3 as a string; float fields accept it
    path.write_text("tasks: [demo]\ntrain: [1\n")
    with pytest.raises(RunConfigError, match=r"r\.yaml: line \d+ invalid YAML"):
        load_run_config(path)


def test_malformed_data_line_names_file_and_line(tmp_path, tiny_model_dir):
    cfg = toy_run_config(tmp_path, tiny_model_dir)
    bad = tmp_path / "copy.jsonl"
    lines = bad.read_text().splitlines()
    lines[6] = '{"input": "Repeat: cat", "target": '
    bad.write_text("\n".join(lines) + "\n")
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    proc = _run_cli(["train", str(cfg_file), "--quiet"])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert f"{bad}" in out and "line 7" in out
    assert "Traceback" not in out


@pytest.mark.parametrize("compile_", [False, True])
def test_train_compile_is_opt_in_and_compiles_the_decoder_for_training(tmp_path, tiny_model_dir, monkeypatch,
                                                                        compile_):
    from mtpeft.model import MTModel
    from mtpeft.training.run_config import run_config_from_dict
    from mtpeft.training.trainer import MultiTaskTrainer

    calls = []
    monkeypatch.setattr(MTModel, "compile", lambda self, **kw: calls.append(kw) or self)
    data = toy_run_config(tmp_path, tiny_model_dir, steps=1)
    assert run_config_from_dict(data).train.compile is False  # the default
    data["train"]["compile"] = compile_
    MultiTaskTrainer(run_config_from_dict(data), progress=False)
    assert calls == ([{}] if compile_ else [])
