"""The mtpeft command: every subcommand's help, bad input as one line with exit code 2, interrupts as 130."""

from __future__ import annotations

import argparse

import pytest

from mtpeft.cli import build_parser, main


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_help_of_the_command_and_every_subcommand(capsys) -> None:  # noqa: ANN001
    names = list(_subcommands())
    assert names == ["train", "validate", "eval", "export", "predict", "demo", "methods", "bench", "analyze"]
    for argv in [["--help"], *([n, "--help"] for n in names)]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0, argv
    assert "usage: mtpeft" in capsys.readouterr().out


def test_bad_input_is_one_error_line_and_exit_code_2(tmp_path, capsys) -> None:  # noqa: ANN001
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"error: run config {tmp_path / 'missing.yaml'} not found"
    assert main(["eval", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'run_config.yaml'} not found")


def test_eval_of_an_unknown_task_names_the_run_tasks(monkeypatch, capsys) -> None:  # noqa: ANN001
    from mtpeft.cli import eval as eval_command
    from mtpeft.training.run_config import run_config_from_dict

    cfg = run_config_from_dict({"tasks": ["demo:arithmetic,reverse"], "method": {"method": "lora"},
                                "model": {"name": "unused"}})
    monkeypatch.setattr(eval_command, "load_run", lambda run_dir: (cfg, None, None))
    assert main(["eval", "RUN", "--tasks", "reverse,nope"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: unknown task(s) ['nope']; this run's tasks: ['arithmetic', 'reverse']"


def test_interrupt_exits_130(monkeypatch, capsys) -> None:  # noqa: ANN001
    from mtpeft.cli import methods

    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(methods, "run", interrupted)
    assert main(["methods"]) == 130
    assert capsys.readouterr().err == "interrupted\n"
