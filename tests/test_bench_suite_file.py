"""``mtpeft bench my_suite.yaml``: suite files, the paired comparisons and the recommendation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import REPO

from mtpeft.bench.paired import compare, paired_interval, recommendation, t_quantile
from mtpeft.bench.suite_file import load_suite_file
from mtpeft.errors import SuiteError

EXAMPLE = REPO / "examples" / "bench" / "local_suite.yaml"


# --- statistics ----------------------------------------------------------------------------------------
def test_t_quantile_matches_the_table() -> None:
    for df, table in ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (10, 2.228), (30, 2.042)):
        assert abs(t_quantile(0.975, df) - table) < 0.005, df


def test_paired_interval_hand_computed() -> None:
    # one task, differences 0, 1, 0, 0: mean 0.25, sample std 0.5, se 0.25, t(0.975, 3) = 3.182
    diff, low, high = paired_interval([[0, 1, 0, 0]])
    assert diff == pytest.approx(0.25)
    assert low == pytest.approx(0.25 - 3.182 * 0.25, abs=2e-3) and high == pytest.approx(0.25 + 3.182 * 0.25, abs=2e-3)
    # two tasks: macro diff = (0.5 + 1) / 2; var = (1/3 / 4 + 0) / 4; df = 3 + 1 = 4 (t = 2.776)
    diff, low, high = paired_interval([[1, 0, 1, 0], [1, 1]])
    half = 2.776 * math.sqrt((1 / 3) / 4 / 4)
    assert diff == pytest.approx(0.75) and low == pytest.approx(0.75 - half, abs=2e-3)
    assert high == pytest.approx(0.75 + half, abs=2e-3)
    assert paired_interval([[1.0]]) == (1.0, -math.inf, math.inf)  # no degrees of freedom


def _run(method: str, seed: int, items: dict[str, list[float]]) -> dict:
    tasks = {t: {"score": sum(v) / len(v), "items": v} for t, v in items.items()}
    return {"method": method, "seed": seed, "tasks": tasks}


def test_compare_pairs_items_within_seeds() -> None:
    runs = {
        "lora": [_run("lora", 0, {"a": [0, 0, 1, 1]}), _run("lora", 1, {"a": [0, 1, 1, 1]})],
        "hydralora": [_run("hydralora", 0, {"a": [1, 1, 1, 1]}), _run("hydralora", 1, {"a": [1, 1, 1, 0]})],
    }
    d = compare("hydralora", "lora", runs, ["a"])
    # per-item differences averaged over seeds 0 and 1: (1+1)/2, (1+0)/2, (0+0)/2, (0-1)/2 = 1, .5, 0, -.5
    assert d is not None and d.seeds == [0, 1] and d.items == 4
    assert d.diff == pytest.approx(0.25)
    sd = math.sqrt(((0.75) ** 2 + 0.25**2 + 0.25**2 + 0.75**2) / 3)
    assert d.high - d.diff == pytest.approx(3.182 * sd / 2, abs=2e-3) and not d.beyond_noise
    # runs without per-item scores, or with different items, give no comparison
    runs["old"] = [{"method": "old", "seed": 0, "tasks": {"a": {"score": 0.5}}}]
    assert compare("old", "lora", runs, ["a"]) is None


def test_recommendation_sentences() -> None:
    runs = {
        "lora": [_run("lora", 0, {"a": [0] * 10 + [1] * 10})],
        "mtlora": [_run("mtlora", 0, {"a": [1] * 20})],
        "thanora": [_run("thanora", 0, {"a": [0] * 9 + [1] * 11})],
        "untrained": [_run("untrained", 0, {"a": [1] * 20})],
    }
    diffs = {m: compare(m, "lora", runs, ["a"]) for m in runs if m != "lora"}
    macro = {"lora": 0.5, "mtlora": 1.0, "thanora": 0.55, "untrained": 1.0}
    text = recommendation(macro, diffs)
    assert text.startswith("Use mtlora: it is ahead of plain LoRA by +50.0 points"), text  # never the untrained
    del diffs["mtlora"], diffs["untrained"]
    assert recommendation(macro, diffs).startswith("plain LoRA is as good here")
    assert recommendation(macro, None).startswith("No recommendation")


# --- suite files ---------------------------------------------------------------------------------------
def _suite(tmp_path: Path, text: str) -> Path:
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"input": f"x{i}", "target": "y"}) + "\n" for i in range(8)))
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    return path


TASK = "tasks: [{name: t, source: t.jsonl, prompt: '{input}', test_size: 2}]\n"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (TASK + "stepz: 3\n", "stepz: unknown key"),
        (TASK + "steps: 0\n", "steps: expected an integer >= 1"),
        (TASK + "lr: fast\n", "lr: expected a positive learning rate"),
        (TASK + "seeds: []\n", "seeds: expected a count"),
        (TASK + "methods: [lora, lorax]\n", "methods: unknown method"),
        (TASK + "budget: lots\n", "budget: expected a parameter count"),
        (TASK + "quick: {tasks: []}\n", "quick.tasks: unknown key"),
        (TASK + "train: 3\n", "train: expected a mapping"),
        ("steps: 3\n", "tasks: expected a non-empty list"),
        ("tasks: [{name: t, source: t.jsonl, promt: x}]\n", "promt"),
        ("tasks: [{name: t, source: missing.jsonl}]\n", "missing.jsonl"),
    ],
)
def test_suite_file_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = _suite(tmp_path, text)
    with pytest.raises((SuiteError, FileNotFoundError)) as info:
        load_suite_file(path)
    message = str(info.value)
    assert key in message and "\n" not in message, message


def test_suite_file_settings(tmp_path: Path) -> None:
    path = _suite(tmp_path, TASK + "steps: 50\nbatch_size: 4\nlr: 2.0e-4\nseeds: [3, 5]\nbudget: 1.5k\n")
    loaded = load_suite_file(path)
    assert loaded.seeds == [3, 5] and loaded.param_budget == 1500 and loaded.methods is None
    train = loaded.suite.config["train"]
    assert (train["steps"], train["batch_size"], train["lr"]) == (50, 4, 2e-4)
    assert loaded.suite.settings[0].tasks[0]["source"] == str((tmp_path / "t.jsonl").resolve())  # beside the file
    quick = load_suite_file(path, quick=True)
    assert quick.seeds == [0] and quick.suite.config["train"]["steps"] == 30 and quick.suite.top_layers == 4


def test_the_example_suite_validates() -> None:
    full = load_suite_file(EXAMPLE)
    assert full.seeds == [0, 1, 2] and "single_task_lora" in full.methods
    assert full.suite.settings[0].task_names == ["capitals", "sentiment", "science"]
    quick = load_suite_file(EXAMPLE, quick=True)
    assert quick.seeds == [0] and quick.suite.config["train"]["steps"] == 20


def test_cli_bench_example_suite_quick_end_to_end(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    """The acceptance check of issue 15: the example suite with --quick, on a tiny random model."""
    from mtpeft.cli import main

    out = tmp_path / "bench"
    code = main(["bench", str(EXAMPLE), "--quick", "--model", str(tiny_model_dir), "--output", str(out),
                 "--threads", "1", "--steps", "6", "--set", "train.device=cpu"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "recommendation: " in printed
    report = (out / "report.md").read_text()
    assert "### Which method for these tasks?" in report and "**Recommendation:**" in report
    assert "vs lora (points, 95% CI)" in report and "vs single_task_lora (points, 95% CI)" in report
    ranking = json.loads((out / "report.json").read_text())["ranking"]["all"]
    assert set(ranking["order"]) == {"lora", "align_lora", "hydralora", "untrained", "single_task_lora"}
    assert ranking["comparisons"]["lora"]["hydralora"]["items"] == 8 + 8 + 8
    result = json.loads((out / "runs/all/lora/seed-0/result.json").read_text())
    assert len(result["tasks"]["capitals"]["items"]) == 8
