"""Trust (#13 items 1-4, 9-12): the CLI never deletes a user's files, two runs never share a folder, ``--resume``
never ignores a change silently, and bad input ends in one error line with exit code 2, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, toy_run_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError

from mtpeft.cli import main
from mtpeft.errors import ResumeError, RunLockedError
from mtpeft.io.atomic import atomic_write_dir
from mtpeft.io.output_dir import LOCK_NAME, clean_orphan_writes
from mtpeft.training.checkpoint import checkpoint_dirs
from mtpeft.training.run_config import run_config_from_dict
from mtpeft.training.trainer import STEP_DELAY_ENV, train

pytestmark = pytest.mark.xdist_group("cli_safety")


def _config_file(folder: Path, model_dir: Path, **changes) -> tuple[Path, dict]:
    cfg = toy_run_config(folder, model_dir, method="mtl_lora", steps=4)
    cfg["eval"]["max_new_tokens"] = 1
    cfg.update(changes)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished mtl_lora run (per-task adapters) on the tiny model; tests that change it copy it first."""
    folder = tmp_path_factory.mktemp("safety-run")
    cfg_file, cfg = _config_file(folder, tiny_model_dir)
    assert main(["train", str(cfg_file), "--quiet"]) == 0
    return Path(cfg["output_dir"])


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    first = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(first) == 1, err
    return first[0]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 1. export never replaces a user's folder ---------------------------------------------------------
def test_export_refuses_a_folder_of_other_files_and_overwrite_keeps_them(trained_run, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep").write_text("x")
    assert main(["export", str(trained_run), "--task", "copy", "--out", str(out)]) == 2
    assert str(out) in _error(capsys) and (out / "keep").read_text() == "x"
    assert main(["export", str(trained_run), "--task", "copy", "--out", str(out), "--overwrite"]) == 0
    assert (out / "keep").read_text() == "x" and (out / "adapter_model.safetensors").is_file()
    # an earlier export of the same format is replaced without --overwrite; the user's file still survives
    assert main(["export", str(trained_run), "--task", "parity", "--out", str(out)]) == 0
    assert (out / "keep").read_text() == "x"
    assert json.loads((out / "mtpeft_export.json").read_text())["task"] == "parity"
    capsys.readouterr()
    # ... but not a merged export into a PEFT export
    assert main(["export", str(trained_run), "--task", "copy", "--format", "merged", "--out", str(out)]) == 2
    assert "peft export" in _error(capsys)


def test_export_into_the_run_or_its_adapter_is_refused_and_the_run_stays_whole(trained_run, capsys):
    before = _tree(trained_run)
    for out in (trained_run, trained_run / "adapter", trained_run.parent):
        assert main(["export", str(trained_run), "--task", "copy", "--out", str(out), "--overwrite"]) == 2
        assert "run folder" in _error(capsys)
    assert _tree(trained_run) == before


def test_atomic_write_dir_keeps_the_files_it_does_not_write(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "mine.txt").write_text("mine")
    (target / "sub").mkdir()
    (target / "sub" / "deep.txt").write_text("deep")
    (target / "ours.bin").write_text("old")
    atomic_write_dir(target, lambda tmp: (tmp / "ours.bin").write_text("new"))
    assert (target / "mine.txt").read_text() == "mine" and (target / "sub" / "deep.txt").read_text() == "deep"
    assert (target / "ours.bin").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temp or old folder left


# --- 2. train into a folder that is not a run ----------------------------------------------------------
def test_train_refuses_a_folder_of_other_files_and_overwrite_keeps_them(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "mine"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "notes.txt").write_text("n")
    (out / "data.csv").write_text("a,b\n")
    cfg_file, _ = _config_file(tmp_path, tiny_model_dir, output_dir=str(out))
    before = _tree(out)
    assert main(["train", str(cfg_file), "--quiet"]) == 2
    line = _error(capsys)
    assert str(out) in line and "--overwrite" in line
    assert _tree(out) == before  # nothing written on refusal
    assert main(["train", str(cfg_file), "--quiet", "--overwrite"]) == 0
    assert (out / "data.csv").read_text() == "a,b\n" and (out / "adapter" / "notes.txt").read_text() == "n"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_a_finished_run_restarts_only_with_overwrite_and_keeps_the_users_files(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    cfg = yaml.safe_load((run / "run_config.yaml").read_text())
    cfg["output_dir"] = str(run)
    cfg_file = tmp_path / "again.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    (run / "my_notes.md").write_text("notes")
    assert main(["train", str(cfg_file), "--quiet"]) == 2
    line = _error(capsys)
    assert "--resume" in line and "--overwrite" in line
    assert main(["train", str(cfg_file), "--quiet", "--overwrite"]) == 0
    assert (run / "my_notes.md").read_text() == "notes"
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


# --- 3. the run lock ----------------------------------------------------------------------------------
def _write_lock(run: Path, pid: int) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "earlier"}))


def test_a_live_lock_is_refused_naming_its_pid_and_a_dead_one_is_taken_over(tmp_path, tiny_model_dir, capsys):
    cfg = toy_run_config(tmp_path, tiny_model_dir, steps=2)
    run = Path(cfg["output_dir"])
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(run, holder.pid)
        with pytest.raises(RunLockedError, match=f"PID {holder.pid}"):
            train(run_config_from_dict(cfg), progress=False)
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # nothing else written
    finally:
        holder.kill()
        holder.wait()
    capsys.readouterr()
    train(run_config_from_dict(cfg), progress=False)  # the holder is dead now (a SIGKILL): taken over
    assert f"from PID {holder.pid}" in capsys.readouterr().err
    assert not (run / LOCK_NAME).exists() and (run / "adapter").is_dir()


def test_a_second_train_into_a_running_folder_names_the_first_ones_pid(tmp_path, tiny_model_dir, capsys):
    cfg_file, cfg = _config_file(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "shared"))
    run = Path(cfg["output_dir"])
    first = subprocess.Popen([sys.executable, "-m", "mtpeft.cli", "train", str(cfg_file), "--quiet"], cwd=REPO,
                             env={**os.environ, STEP_DELAY_ENV: "2"}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run / LOCK_NAME).exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert main(["train", str(cfg_file), "--quiet"]) == 2
        assert f"PID {first.pid}" in _error(capsys)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert main(["train", str(cfg_file), "--quiet", "--resume"]) == 0  # the killed run's lock is stale
    assert f"PID {first.pid}" in capsys.readouterr().err


# --- 4. --resume checks first -------------------------------------------------------------------------
def test_resume_refuses_a_changed_lr_without_writing_and_records_applied_changes(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    cfg = yaml.safe_load((run / "run_config.yaml").read_text())
    cfg["output_dir"] = str(run)
    (run / "run_config.yaml").write_text(yaml.safe_dump(cfg))
    before = _tree(run)
    changed = {**cfg, "train": {**cfg["train"], "lr": 0.5}}
    with pytest.raises(ResumeError, match=r"train\.lr: 0\.01 -> 0\.5"):
        train(run_config_from_dict(changed), resume=True, progress=False)
    assert _tree(run) == before
    longer = {**cfg, "train": {**cfg["train"], "steps": 6}}
    assert train(run_config_from_dict(longer), resume=True, progress=False).steps == 6
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 4, "resumed_with_changes": {"train.steps": [4, 6]}} in records
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]


# --- 9. one-line errors, exit code 2 ------------------------------------------------------------------
def test_a_missing_model_path_is_one_line(tmp_path, tiny_model_dir, capsys):
    cfg_file, _ = _config_file(tmp_path, tiny_model_dir, model={"name": str(tmp_path / "no-such-model")})
    assert main(["train", str(cfg_file), "--quiet"]) == 2
    assert "no-such-model" in _error(capsys)


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "file").write_text("x")
    cfg_file, _ = _config_file(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "file"))
    assert main(["train", str(cfg_file), "--quiet"]) == 2
    assert "is a file" in _error(capsys) and (tmp_path / "file").read_text() == "x"


def test_a_read_only_output_folder_is_one_line(tmp_path, tiny_model_dir, capsys, monkeypatch):
    cfg_file, cfg = _config_file(tmp_path, tiny_model_dir)
    run = Path(cfg["output_dir"])
    run.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: fail the first write as a read-only mount does
        def read_only(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(Path, "write_text", read_only)
    else:
        run.chmod(0o555)
    try:
        assert main(["train", str(cfg_file), "--quiet"]) == 2
    finally:
        run.chmod(0o755)
    assert "Permission denied" in _error(capsys)


def test_a_full_disk_in_a_checkpoint_write_is_one_line(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import mtpeft.training.checkpoint as checkpoint

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(checkpoint, "save_file", full)
    cfg_file, _ = _config_file(tmp_path, tiny_model_dir)
    assert main(["train", str(cfg_file), "--quiet"]) == 2
    assert "could not write checkpoint" in _error(capsys)


def test_predict_without_task_for_a_per_task_method_and_an_empty_prompt(trained_run, capsys):
    assert main(["predict", str(trained_run), "Repeat: cat\nA:"]) == 2
    assert "--task" in _error(capsys)
    assert main(["predict", str(trained_run), "--task", "copy", ""]) == 2
    assert "empty" in _error(capsys)
    assert main(["predict", str(trained_run), "--task", "copy", "Repeat: cat\nA:"]) == 0


# --- 10. validate checks paths ------------------------------------------------------------------------
def test_validate_checks_the_data_files_and_the_model_path(tmp_path, tiny_model_dir, capsys):
    cfg_file, cfg = _config_file(tmp_path, tiny_model_dir)
    assert main(["validate", str(cfg_file)]) == 0
    assert "model=local" in capsys.readouterr().out
    assert main(["validate", str(cfg_file), "--set", "model.name=HuggingFaceTB/SmolLM2-135M"]) == 0
    assert "not checked offline" in capsys.readouterr().out
    assert main(["validate", str(cfg_file), "--set", f"model.name={tmp_path / 'gone'}"]) == 2
    assert "gone" in _error(capsys)
    Path(cfg["tasks"][0]["source"]).unlink()
    assert main(["validate", str(cfg_file)]) == 2
    assert cfg["tasks"][0]["source"] in _error(capsys)


# --- 11. a killed checkpoint write's temp folders -----------------------------------------------------
def test_orphan_temp_folders_of_a_killed_write_are_removed_at_start(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    cfg = yaml.safe_load((run / "run_config.yaml").read_text())
    cfg["output_dir"] = str(run)
    orphans = [run / "checkpoints" / ".step-0000006.tmp-ab_cd123", run / ".adapter.tmp-x1y2z3w4"]
    kept = [run / "checkpoints" / ".step-x.tmp-ab_cd123", run / ".mine.tmp-x1y2z3w4", run / "checkpoints" / "notes"]
    for folder in orphans + kept:
        folder.mkdir()
        (folder / "f").write_text("x")
    assert train(run_config_from_dict(cfg), resume=True, progress=False).steps == 4
    assert not any(p.exists() for p in orphans) and all((p / "f").is_file() for p in kept)
    assert "unfinished write" in capsys.readouterr().err
    assert clean_orphan_writes(run) == [] and checkpoint_dirs(run)


# --- 12. remote code needs the flag -------------------------------------------------------------------
def test_remote_code_from_a_run_folder_needs_the_flag(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    cfg = yaml.safe_load((run / "run_config.yaml").read_text())
    cfg["model"]["trust_remote_code"] = True
    (run / "run_config.yaml").write_text(yaml.safe_dump(cfg))
    for argv in (["eval", str(run)], ["predict", str(run), "--task", "copy", "Hi"],
                 ["export", str(run), "--task", "copy", "--out", str(tmp_path / "e")], ["analyze", str(run)]):
        assert main(argv + ["--quiet"] if argv[0] == "eval" else argv) == 2
        assert "--trust-remote-code" in _error(capsys)
    assert main(["predict", str(run), "--task", "copy", "Hi", "--trust-remote-code"]) == 0


# --- fuzz: output folders and resume changes ----------------------------------------------------------
_NAMES = ["adapter", "eval", "metrics.jsonl", "run_config.yaml", "checkpoints", "keep.txt", ".hidden", LOCK_NAME,
          "mtpeft_run.json", "mtpeft_export.json", "adapter_config.json"]


@settings(max_examples=60, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.sets(st.sampled_from(_NAMES), max_size=5), overwrite=st.booleans(),
       kind=st.sampled_from(["peft", "merged"]))
def test_fuzz_output_folder_checks_refuse_or_pass_and_never_touch_a_file(tmp_path_factory, names, overwrite, kind):
    from mtpeft.errors import OutputFolderError
    from mtpeft.io.output_dir import check_export_folder, check_output_folder, is_run_folder

    folder = tmp_path_factory.mktemp("fuzz-out")
    for name in names:
        (folder / name).mkdir() if "." not in name.strip(".") else (folder / name).write_text("{}")
    before = _tree(folder), sorted(p.name for p in folder.iterdir())
    mine = {n for n in names if n != LOCK_NAME}
    try:
        check_output_folder(folder, overwrite=overwrite)
        assert overwrite or not mine or is_run_folder(folder)
    except OutputFolderError as exc:
        assert str(folder) in str(exc) and not overwrite and mine
    try:
        check_export_folder(folder, kind, folder.parent / "elsewhere", overwrite=overwrite)
    except OutputFolderError as exc:
        assert str(folder) in str(exc) and not overwrite and names
    assert (_tree(folder), sorted(p.name for p in folder.iterdir())) == before


@settings(max_examples=80, deadline=None, database=None, derandomize=True)
@given(key=st.sampled_from(["train.lr", "train.seed", "train.batch_size", "method.r", "model.name", "data.max_length",
                            "train.steps", "train.log_every", "eval.batch_size", "output_dir"]),
       value=st.one_of(st.integers(-3, 3), st.floats(allow_nan=False), st.text(max_size=3), st.none()))
def test_fuzz_resume_changes_refuse_every_key_that_changes_what_was_trained(key, value):
    from mtpeft.training.run_folder import RESUMABLE_KEYS, resume_changes

    saved = {"method": {"method": "lora", "r": 4}, "model": {"name": "m"}, "data": {"max_length": 32},
             "train": {"lr": 0.01, "seed": 3, "batch_size": 4, "steps": 6, "log_every": 1},
             "eval": {"batch_size": 8}, "output_dir": "runs/a"}
    new = json.loads(json.dumps(saved))
    section, _, field = key.rpartition(".")
    (new[section] if section else new)[field] = value
    allowed, refused = resume_changes(saved, new)
    changed = json.dumps(value) != json.dumps((saved[section] if section else saved)[field])
    free = any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS)
    assert set(allowed) | set(refused) == ({key} if changed else set())
    assert (key in refused) == (changed and not free)
