"""The benchmark harness: suites, run planning, the parameter budget, the runner on a tiny model, the report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from conftest import toy_run_config, write_jsonl

from mtpeft.bench import (
    BenchError,
    BenchOptions,
    SuiteError,
    choose_rank,
    custom_suite,
    get_suite,
    plan_runs,
    run_bench,
    validate_methods,
    write_report,
)
from mtpeft.bench.options import split_overrides
from mtpeft.bench.scoring import unseen_task_id
from mtpeft.bench.suites import QUICK_BBH_TASKS, SuiteSetting

PNG = b"\x89PNG\r\n\x1a\n"



# --- suites ------------------------------------------------------------------------------------------
def test_builtin_suites() -> None:
    full = get_suite("bbh27")
    assert len(full.settings) == 1 and len(full.settings[0].tasks) == 27 and full.top_layers is None
    quick = get_suite("bbh27", quick=True)
    assert quick.settings[0].task_names == list(QUICK_BBH_TASKS) and quick.top_layers == 4
    scaling = get_suite("bbh-scaling")
    sizes = [s.num_tasks for s in scaling.settings]
    assert sizes == [5, 15, 27]
    for small, big in zip(scaling.settings, scaling.settings[1:]):
        assert big.task_names[: small.num_tasks] == small.task_names  # nested settings
    assert [s.steps for s in scaling.settings] == [round(544 * n / 27) for n in sizes]
    fixed = get_suite("bbh-scaling", scaling_steps="fixed")
    assert {s.steps for s in fixed.settings} == {544}
    assert scaling.core_tasks == list(QUICK_BBH_TASKS)
    cs = get_suite("commonsense")
    assert cs.settings[0].task_names == ["boolq", "arc_easy", "arc_challenge", "obqa"]
    assert cs.settings[0].unseen_names == ["piqa", "siqa", "winogrande"]
    assert get_suite("glue", quick=True).settings[0].num_tasks == 4


def test_bad_names_list_the_allowed_ones() -> None:
    with pytest.raises(SuiteError, match="available suites.*bbh27"):
        get_suite("bbh28")
    with pytest.raises(BenchError, match="unknown method.*'lorax'.*allowed.*single_task_lora"):
        validate_methods("lora,lorax")
    with pytest.raises(BenchError, match="methods.<method>.<key>"):
        split_overrides(["methods.nope.r=4"])
    general, per_method = split_overrides(["train.lr=1e-3", "methods.hydralora.num_experts=8"])
    assert general == ["train.lr=1e-3"] and per_method == {"hydralora": ["method.num_experts=8"]}


def test_unseen_policy() -> None:
    assert unseen_task_id("lora", "auto") == ("none", None)
    assert unseen_task_id("moe_lora", "auto") == ("none", None)  # its learned unknown-task gate
    assert unseen_task_id("mtl_lora", "auto") == ("id", 0)
    assert unseen_task_id("single_task_lora", "auto") == ("id", 0)
    assert unseen_task_id("ta_lora", "skip") == ("skip", None)
    assert unseen_task_id("lora", "first_task") == ("id", 0)
    assert unseen_task_id("untrained", "skip") == ("none", None)
    assert unseen_task_id("peft_lora", "skip") == ("none", None)  # task-agnostic, as lora
    assert unseen_task_id("peft_lora", "first_task") == ("id", 0)


def test_choose_rank_comes_closest_to_the_budget() -> None:
    def count(cfg: dict) -> int:
        if cfg["r"] < 3:  # like ThanoRA with 3 tasks
            from mtpeft.config import ConfigError

            raise ConfigError("r too small")
        return 100 * cfg["r"] + 7

    assert choose_rank("unused", {"method": "lora"}, ["a"], 760, count=count) == (8, 807)  # |807-760| < |707-760|
    assert choose_rank("unused", {"method": "lora"}, ["a"], 100, count=count) == (3, 307)  # smallest valid rank
    assert choose_rank("unused", {"method": "lora"}, ["a"], 10**9, max_rank=64, count=count) == (64, 6407)


def test_plans_for_every_builtin_suite_validate(smollm2_dir: Path) -> None:
    """Every method's run config of every suite (full and quick) is valid for SmolLM2."""
    methods = [
        "lora",
        "align_lora",
        "thanora",
        "mtlora",
        "hydralora",
        "mtl_lora",
        "moe_lora",
        "ta_lora",
        "untrained",
        "single_task_lora",
    ]
    for name in ("bbh27", "bbh-scaling", "glue", "commonsense"):
        for quick in (False, True):
            runs = plan_runs(get_suite(name, quick=quick), BenchOptions(methods=methods, seeds=[0, 1]), "/tmp/x")
            settings = len(get_suite(name).settings)
            assert len(runs) == settings * (2 * (len(methods) - 1) + 1)  # untrained runs once
            thanora = next(r for r in runs if r.method == "thanora" and r.setting == runs[-1].setting)
            assert thanora.config["method"]["r"] >= len(thanora.config["tasks"])
            for r in runs:
                if r.method in ("untrained", "ta_lora"):
                    continue
                layers = r.config["method"].get("layers_to_transform")
                assert (layers == [26, 27, 28, 29]) if quick else layers is None
                assert r.config["method"]["alpha"] == 2 * r.config["method"]["r"]


# --- the runner on a tiny model -----------------------------------------------------------------------
def _toy_suite(tmp_path: Path, model_dir: Path, steps: int = 4):
    raw = toy_run_config(tmp_path / "data", model_dir, "lora", steps=steps, save_every=2)
    unseen_file = write_jsonl(
        tmp_path / "data" / "echo.jsonl",
        [{"input": f"Say {w}", "target": w} for w in ["a", "b", "c", "d", "e", "f"] * 3],
    )
    unseen = {
        "name": "echo",
        "source": str(unseen_file),
        "prompt": "{input}\nA:",
        "target": " {target}",
        "test_size": 6,
        "metric": "exact_match",
    }
    config = {k: raw[k] for k in ("model", "data", "train", "eval")}
    return custom_suite(raw["tasks"], config, name="toy", unseen=[unseen])


def test_bench_runner_end_to_end(tmp_path: Path, tiny_model_dir: Path, one_thread) -> None:
    suite = _toy_suite(tmp_path, tiny_model_dir)
    options = BenchOptions(methods=["lora", "mtl_lora", "untrained", "single_task_lora"], seeds=[0])
    out = tmp_path / "bench"
    logs: list[str] = []
    res = run_bench(suite, options, out, log=logs.append)
    assert len(res["results"]) == 4
    for method in options.methods:
        result = json.loads((out / "runs" / "all" / method / "seed-0" / "result.json").read_text())
        assert set(result["tasks"]) == {"copy", "parity"}
        for key in ("config", "versions", "git", "wall_time_s", "peak_memory", "trainable_parameters", "macro"):
            assert key in result, (method, key)
        assert {"torch", "transformers", "peft", "mtpeft"} <= set(result["versions"])
        assert {"revision", "dirty"} <= set(result["git"])
        assert result["peak_memory"]["cpu_max_rss_mb"] > 0
        assert result["config"]["train"]["seed"] == 0 and result["config"]["tasks"][0]["name"] == "copy"
        assert "echo" in result["unseen"]  # no method skips under the 'auto' policy
    lora = json.loads((out / "runs/all/lora/seed-0/result.json").read_text())
    assert lora["trainable_parameters"] > 0 and lora["steps"] == 4 and lora["unseen_how"] == "no task id"
    assert (Path(lora["run_dir"]) / "adapter").is_dir()
    mtl = json.loads((out / "runs/all/mtl_lora/seed-0/result.json").read_text())
    assert mtl["unseen_how"].startswith("task id 0")
    single = json.loads((out / "runs/all/single_task_lora/seed-0/result.json").read_text())
    assert single["steps_per_task"] == 2 and set(single["subruns"]) == {"copy", "parity"}
    assert single["trainable_parameters"] == 2 * single["trainable_parameters_per_adapter"]
    untrained = json.loads((out / "runs/all/untrained/seed-0/result.json").read_text())
    assert untrained["trainable_parameters"] == 0
    report = (out / "report.md").read_text()
    assert "| lora |" in report and "| untrained |" in report and "echo (unseen)" in report
    for png in ("per_task_all.png", "score_vs_params.png"):
        assert (out / "plots" / png).read_bytes()[:8] == PNG

    # re-invoking the same benchmark skips every finished run
    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/seed-*/result.json")}
    logs.clear()
    run_bench(suite, options, out, log=logs.append)
    assert "4 already finished" in logs[0] and not any("running" in line for line in logs)
    assert before == {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/seed-*/result.json")}
    # ... but a changed run config in the same folder is an error naming the change
    changed = BenchOptions(methods=["lora"], seeds=[0], overrides=["train.lr=0.5"])
    with pytest.raises(BenchError, match="train.lr"):
        run_bench(suite, changed, out, log=logs.append)


def test_peft_lora_baseline_in_a_tiny_bench(tmp_path: Path, tiny_model_dir: Path, one_thread) -> None:
    suite = _toy_suite(tmp_path, tiny_model_dir)
    out = tmp_path / "bench"
    run_bench(suite, BenchOptions(methods=["lora", "peft_lora"], seeds=[0]), out, log=lambda _: None)
    lora = json.loads((out / "runs/all/lora/seed-0/result.json").read_text())
    peft = json.loads((out / "runs/all/peft_lora/seed-0/result.json").read_text())
    assert peft["config"]["method"] == lora["config"]["method"] and peft["config"]["train"] == lora["config"]["train"]
    assert peft["steps"] == lora["steps"] == 4 and peft["trainable_parameters"] == lora["trainable_parameters"]
    assert peft["adapted_modules"] == 14 and peft["peft_version"]  # 7 linears in each of 2 layers
    for task in ("copy", "parity"):  # the same test items, pairable
        assert len(peft["tasks"][task]["items"]) == len(lora["tasks"][task]["items"]) == 8
    assert peft["unseen_how"] == "no task id" and len(peft["unseen"]["echo"]["items"]) == 6
    assert (Path(peft["run_dir"]) / "adapter" / "adapter_config.json").is_file()
    assert len((Path(peft["run_dir"]) / "metrics.jsonl").read_text().splitlines()) == 4
    report = (out / "report.md").read_text()
    assert report.count("| peft_lora |") == 3  # summary, per task, ranking
    assert "mtpeft LoRA vs Hugging Face PEFT LoRA:** peft_lora - lora" in report
    ranking = json.loads((out / "report.json").read_text())["ranking"]["all"]
    assert ranking["comparisons"]["lora"]["peft_lora"]["items"] == 16
    assert "peft_lora" not in ranking["recommendation"]


def test_missing_data_fails_before_training(tmp_path: Path, tiny_model_dir: Path) -> None:
    suite = _toy_suite(tmp_path, tiny_model_dir)
    suite.settings[0].unseen = [{"name": "gone", "source": str(tmp_path / "gone.jsonl"), "test_size": 2}]
    with pytest.raises(FileNotFoundError, match="gone.jsonl"):
        run_bench(suite, BenchOptions(methods=["lora"]), tmp_path / "b", log=lambda _: None)
    assert not (tmp_path / "b" / "runs").exists()


def test_param_budget_on_the_tiny_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    suite = _toy_suite(tmp_path, tiny_model_dir)
    options = BenchOptions(methods=["lora", "thanora", "hydralora", "single_task_lora"], seeds=[0], param_budget=20000)
    runs = {r.method: r for r in plan_runs(suite, options, tmp_path / "b")}
    for method, run in runs.items():
        assert abs(run.planned_parameters - 20000) / 20000 < 0.35, (method, run.planned_parameters)
        assert any("budget" in n for n in run.notes)
    assert runs["lora"].config["method"]["r"] > runs["hydralora"].config["method"]["r"]
    with pytest.raises(BenchError, match="do not also set method.r"):
        plan_runs(suite, BenchOptions(methods=["lora"], param_budget=1000, overrides=["method.r=4"]), tmp_path)


# --- report -------------------------------------------------------------------------------------------
def _fake_result(setting: str, method: str, seed: int, scores: dict[str, float], params: int) -> dict:
    return {
        "setting": setting,
        "method": method,
        "seed": seed,
        "tasks": {
            t: {"metric": "exact_match", "score": s, "n": 10, "metrics": {"exact_match": s}} for t, s in scores.items()
        },
        "macro": sum(scores.values()) / len(scores),
        "micro": sum(scores.values()) / len(scores),
        "trainable_parameters": params,
        "wall_time_s": 60.0 + seed,
        "peak_memory": {"cpu_max_rss_mb": 1000.0, "gpu_max_allocated_mb": None},
        "notes": [],
    }


def test_report_with_seeds_and_a_scaling_curve(tmp_path: Path) -> None:
    tasks = ["t1", "t2", "t3", "t4"]
    (tmp_path / "bench.json").write_text(
        json.dumps(
            {
                "suite": "toy-scaling",
                "core_tasks": tasks[:2],
                "options": {"methods": ["lora", "thanora"]},
                "settings": [{"name": f"tasks-{n}", "steps": 10 * n} for n in (2, 4)],
            }
        )
    )
    for n in (2, 4):
        for method, base in (("lora", 0.5), ("thanora", 0.6), ("untrained", 0.1)):
            for seed in [0] if method == "untrained" else [0, 1]:
                scores = {t: base + 0.1 * seed - 0.02 * n for t in tasks[:n]}
                folder = tmp_path / "runs" / f"tasks-{n}" / method / f"seed-{seed}"
                folder.mkdir(parents=True)
                (folder / "result.json").write_text(
                    json.dumps(
                        _fake_result(f"tasks-{n}", method, seed, scores, 0 if method == "untrained" else 1000 * n)
                    )
                )
    failed = tmp_path / "runs" / "tasks-4" / "hydralora" / "seed-0"
    failed.mkdir(parents=True)
    (failed / "error.json").write_text(
        json.dumps({"setting": "tasks-4", "method": "hydralora", "seed": 0, "error": "RuntimeError: boom"})
    )
    paths = write_report(tmp_path)
    report = Path(paths["markdown"]).read_text()
    assert "| lora | 2 | 2,000 | 51.0 ± 7.1 |" in report  # 2 tasks: seeds 0.46 and 0.56
    assert "## Scaling" in report and "| lora | 51.0 ± 7.1 | 47.0 ± 7.1 |" in report
    assert "RuntimeError: boom" in report
    for name in ("per_task_tasks-2.png", "per_task_tasks-4.png", "score_vs_params.png", "scaling.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == PNG
    agg = json.loads(Path(paths["json"]).read_text())["settings"]
    assert agg["tasks-4"]["methods"]["thanora"]["macro"]["n"] == 2
    assert agg["tasks-4"]["methods"]["untrained"]["seeds"] == [0]


def test_custom_suite_checks() -> None:
    with pytest.raises(SuiteError, match="unknown section"):
        custom_suite([{"name": "a", "source": "x.jsonl"}], {"trian": {}})
    with pytest.raises(SuiteError, match="repeats task names"):
        custom_suite([], {}, settings=[SuiteSetting("s", ["bbh:navigate"], ["bbh:navigate"])])


# --- command line ------------------------------------------------------------------------------------
def test_cli_errors_and_help(capsys) -> None:
    from mtpeft.cli import build_parser, main

    assert main(["bench", "nosuchsuite", "--dry-run"]) == 2
    assert "available suites" in capsys.readouterr().err
    assert main(["bench", "bbh27", "--methods", "lora,nope", "--dry-run"]) == 2
    assert "allowed" in capsys.readouterr().err
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "peft_lora" in subs.choices["bench"].format_help()
    for name in ("bench", "analyze"):
        for action in subs.choices[name]._actions:
            assert action.help, (name, action.dest)


def test_a_methods_preset_wins_over_the_bench_wide_rank_dropout_and_alpha():
    from mtpeft.bench.plan import build_method_config

    suite = get_suite("bbh27", quick=True)
    setting = suite.settings[0]
    plain, _ = build_method_config("mtlora", suite, setting, BenchOptions(methods=["mtlora"]))
    assert (plain["r"], plain["alpha"], plain["dropout"]) == (8, 16.0, 0.05)
    options = BenchOptions(overrides=["methods.mtlora.preset=paper"], methods=["mtlora"])
    paper, _ = build_method_config("mtlora", suite, setting, options)
    assert (paper["r"], paper["alpha"], paper["dropout"]) == (16, 64, 0.05)
    options.overrides.append("methods.mtlora.alpha=8")
    explicit, _ = build_method_config("mtlora", suite, setting, options)
    assert (explicit["r"], explicit["alpha"]) == (16, 8)
