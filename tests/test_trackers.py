"""Experiment tracking (``train.report_to``) through accelerate's trackers, tested with TensorBoard."""

from __future__ import annotations

import pytest
from conftest import toy_run_config

from mtpeft.errors import MtpeftError, RunConfigError
from mtpeft.training import tracking
from mtpeft.training.run_config import run_config_from_dict
from mtpeft.training.trainer import train


def event_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return found


def test_tensorboard_gets_loss_lr_throughput_and_eval_scores(tmp_path, tiny_model_dir):
    pytest.importorskip("tensorboard")
    raw = toy_run_config(tmp_path, tiny_model_dir, steps=4, save_every=0, log_every=2, eval_every=2,
                         report_to=["tensorboard"])
    result = train(run_config_from_dict(raw), progress=False)
    folder = result.output_dir / tracking.TRACKING_DIR
    scalars = event_scalars(folder)
    assert [step for step, _ in scalars["train/loss"]] == [2, 4]
    for tag in ("train/lr", "train/tokens_per_s", "eval/macro", "eval/micro", "eval/copy/exact_match"):
        assert tag in scalars, sorted(scalars)
    assert scalars["eval/macro"][-1][0] == 4  # the final evaluation, at the last step
    loss_by_step = dict(scalars["train/loss"])
    logged = [line for line in (result.output_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(logged) == 2 and loss_by_step[4] == pytest.approx(result.final_loss, rel=1e-5)


def test_tracking_is_off_by_default(tmp_path, tiny_model_dir):
    raw = toy_run_config(tmp_path, tiny_model_dir, steps=2, save_every=0)
    result = train(run_config_from_dict(raw), progress=False)
    assert not (result.output_dir / tracking.TRACKING_DIR).exists()


def test_report_to_is_checked_before_anything_is_written(tmp_path, tiny_model_dir, monkeypatch):
    with pytest.raises(RunConfigError, match=r"train.report_to must be one of \[.*'tensorboard'.*got 'tensorbored'"):
        run_config_from_dict(toy_run_config(tmp_path, tiny_model_dir, report_to=["tensorbored"]))
    assert run_config_from_dict(toy_run_config(tmp_path, tiny_model_dir, report_to="none")).train.report_to == []
    assert run_config_from_dict(toy_run_config(tmp_path, tiny_model_dir, report_to="wandb")).train.report_to == [
        "wandb"]
    monkeypatch.setattr("accelerate.tracking.get_available_trackers", lambda: [])
    cfg = run_config_from_dict(toy_run_config(tmp_path, tiny_model_dir, report_to=["mlflow"]))
    with pytest.raises(MtpeftError, match=r"train.report_to: \['mlflow'\] not installed \(pip install mlflow\)"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_scalars_name_train_and_eval_values():
    record = {"step": 3, "loss": 1.5, "lr": 1e-3, "aux/balance": 0.25, "tokens_per_s": 100.0, "tasks": ["a"],
              "task_loss/qa": 1.25, "counters": {"skips": 2}, "eval_macro": 0.5,
              "eval_qa": {"exact_match": 0.75, "n": 4}, "bad": float("nan")}
    assert tracking.scalars(record) == {"train/loss": 1.5, "train/lr": 1e-3, "train/aux/balance": 0.25,
                                        "train/tokens_per_s": 100.0, "train/task_loss/qa": 1.25,
                                        "train/counters/skips": 2.0,
                                        "eval/macro": 0.5, "eval/qa/exact_match": 0.75, "eval/qa/n": 4.0}


def test_trackers_may_change_on_resume_and_overwrite_removes_their_logs():
    from mtpeft.training.run_folder import RUN_OUTPUTS, resume_changes

    allowed, refused = resume_changes({"train": {"report_to": []}}, {"train": {"report_to": ["tensorboard"]}})
    assert list(allowed) == ["train.report_to"] and not refused
    assert tracking.TRACKING_DIR in RUN_OUTPUTS
