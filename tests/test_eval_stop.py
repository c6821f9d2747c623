"""Stop sequences per task (lm-eval's ``until``), chat templates, and scores before training saved to the run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO, toy_run_config

from mtpeft.data.collator import (
    MultiTaskCollator,
    encode_prompts,
    tokenize_prompt,
    use_chat_template,
)
from mtpeft.data.spec import Example, TaskSpec, TaskSpecError
from mtpeft.evaluation import evaluate
from mtpeft.evaluation.generation import cut_at_stop_strings
from mtpeft.evaluation.options import score_options


class ScriptedModel:
    """Answers every prompt with the same continuation text (greedy generation stand-in); accepts task ids."""

    def __init__(self, tokenizer, continuation: str) -> None:
        self.continuation = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        self.prompts: list[list[int]] = []

    def parameters(self):
        return iter(())

    def generate(self, input_ids, attention_mask, task_ids=None, max_new_tokens=16, **kwargs):
        self.prompts += [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
        new = torch.tensor(self.continuation[:max_new_tokens], dtype=torch.long)
        return torch.cat([input_ids, new.expand(input_ids.shape[0], -1)], dim=1)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    import transformers as tf

    return tf.AutoTokenizer.from_pretrained(smollm2_dir)


def _capital_task(**spec) -> tuple[TaskSpec, list[Example]]:
    task = TaskSpec(name="capital", source="unused.jsonl", **spec)
    return task, [Example("capital", "The capital of Canada is", " Ottawa"),
                  Example("capital", "The largest city of Canada is", " Toronto")]


# ------------------------------------------------------------------------------------------------ stop strings


def test_cut_at_stop_strings_matches_lm_eval():
    cases = [("Toronto\nThe capital", ["\n"]), ("a b\n\nc", ["\n\n", "\n"]), ("xay", ["ay", "y"]), ("abc", []),
             ("stop at Q: here", ["Q:", "\n"]), ("xy z", ["y z", "xy"])]
    expected = ["Toronto", "a b", "x", "abc", "stop at ", "x"]  # one stop string after the other, as lm-eval
    assert [cut_at_stop_strings(text, stop) for text, stop in cases] == expected
    lm_utils = pytest.importorskip("lm_eval.models.utils", reason="lm-eval not installed: compared by hand only")
    assert [lm_utils.postprocess_generated_text(text, list(stop), None) for text, stop in cases] == expected


def test_spec_stop_key_defaults_and_validation():
    spec = TaskSpec.from_dict({"name": "t", "source": "x.jsonl", "stop": ["\n\n", "Q:"]})
    assert spec.stop == ["\n\n", "Q:"] and spec.resolved_stop([" a\nb"]) == ["\n\n", "Q:"]
    plain = TaskSpec(name="t", source="x.jsonl")
    assert plain.resolved_stop([" one line", " another\n"]) == ["\n"]  # a trailing newline is still one line
    assert plain.resolved_stop([" line one\nline two"]) == []  # multi-line targets: only EOS ends the answer
    assert TaskSpec(name="t", source="x.jsonl", stop=[]).resolved_stop([" a"]) == []
    with pytest.raises(TaskSpecError, match="stop strings must be non-empty"):
        TaskSpec(name="t", source="x.jsonl", stop=[""])


def test_generation_is_scored_up_to_the_first_newline(tokenizer):
    """A base model that answers `Toronto` and keeps talking is right (it was counted wrong before)."""
    model = ScriptedModel(tokenizer, " Toronto\nThe capital of Canada is Ottawa.")
    spec, examples = _capital_task()
    result = evaluate(model, tokenizer, [(spec, examples)], ["capital"], progress=False, max_new_tokens=32)
    assert [p["prediction"] for p in result.predictions] == [" Toronto", " Toronto"]
    assert result.score("capital") == 0.5


def test_configured_stop_strings_and_no_stop(tokenizer):
    model = ScriptedModel(tokenizer, " Toronto, Ontario\nnext")
    spec, examples = _capital_task(stop=[","])
    result = evaluate(model, tokenizer, [(spec, examples)], ["capital"], progress=False, max_new_tokens=32)
    assert result.predictions[1]["prediction"] == " Toronto"
    spec, examples = _capital_task(stop=[])
    result = evaluate(model, tokenizer, [(spec, examples)], ["capital"], progress=False, max_new_tokens=32)
    assert result.predictions[1]["prediction"] == " Toronto, Ontario\nnext"


# ----------------------------------------------------------------------------------------------- chat templates

TEMPLATE = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}" \
           "<<assistant>>{% endif %}"


def test_chat_template_settings(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    plain = tokenize_prompt(tok, "What is 2+2?")
    assert tokenize_prompt(use_chat_template(tok, "none"), "What is 2+2?") == plain
    use_chat_template(tok, "auto")  # SmolLM2-Instruct has its own template
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                             add_generation_prompt=True)
    assert tokenize_prompt(tok, "What is 2+2?") == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    use_chat_template(tok, TEMPLATE)
    assert tok.decode(tokenize_prompt(tok, "Hi")) == "<<user>>Hi<<assistant>>"
    tok.chat_template = None
    assert tokenize_prompt(use_chat_template(tok, "auto"), "Hi") == tokenize_prompt(tokenizer, "Hi")  # none to use


def test_chat_template_alike_in_training_generation_and_option_scoring(tokenizer):
    import copy

    tok = use_chat_template(copy.deepcopy(tokenizer), TEMPLATE)
    chat = tok("<<user>>Is 4 even?<<assistant>>", add_special_tokens=False)["input_ids"]
    ex = Example("parity", "Is 4 even?", " yes", options=["yes", "no"], label="yes", option_targets=[" yes", " no"])
    ids, labels = MultiTaskCollator(tok, ["parity"], max_length=64).encode(ex)
    assert ids[: len(chat)] == chat and all(v == -100 for v in labels[: len(chat)])
    enc = encode_prompts(tok, [ex.prompt])
    assert enc["input_ids"][0].tolist() == chat
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, input_ids, attention_mask, task_ids=None):
            seen.extend(input_ids.tolist())
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, len(tok))})()

    score_options(Recorder(), tok, [ex], 0)
    assert all(row[: len(chat)] == chat for row in seen) and len(seen) == 2


# ------------------------------------------------------------------------------ runs: config and saved scores


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mtpeft.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                               "PYTHONPATH": str(REPO / "src")}, timeout=600)


def test_train_records_chat_template_and_saves_scores_before_training(tmp_path, tiny_model_dir):
    from mtpeft.runs import load_run
    from mtpeft.training.run_config import run_config_from_dict
    from mtpeft.training.trainer import MultiTaskTrainer

    raw = toy_run_config(tmp_path, tiny_model_dir, steps=2, save_every=0)
    raw["data"]["chat_template"] = TEMPLATE
    raw["eval"]["before_training"] = True
    trainer = MultiTaskTrainer(run_config_from_dict(raw), progress=False)
    assert tokenize_prompt(trainer.tokenizer, "x") == trainer.tokenizer("<<user>>x<<assistant>>",
                                                                       add_special_tokens=False)["input_ids"]
    result = trainer.train()
    run = tmp_path / "run"
    assert yaml.safe_load((run / "run_config.yaml").read_text())["data"]["chat_template"] == TEMPLATE
    before = json.loads((run / "eval" / "before.json").read_text())
    assert before["macro"] == pytest.approx(result.eval_before.macro)
    assert (run / "eval" / "before.md").read_text().startswith("| task")
    assert (run / "eval" / "before_predictions.jsonl").is_file() and (run / "eval" / "metrics.json").is_file()
    _, tokenizer, _ = load_run(run)  # eval and predict load the run's tokenizer with the same template
    assert tokenize_prompt(tokenizer, "x") == tokenize_prompt(trainer.tokenizer, "x")


def test_eval_bare_model_saves_before_scores(tmp_path, tiny_model_dir):
    raw = toy_run_config(tmp_path, "unused-model")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = _cli("eval", "--model", str(tiny_model_dir), str(config), "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    before = json.loads((tmp_path / "run" / "eval" / "before.json").read_text())
    assert sorted(before["tasks"]) == ["copy", "parity"] and before["tasks"]["copy"]["n"] == 8
    assert (tmp_path / "run" / "eval" / "before.md").is_file() and "macro" in proc.stdout
    assert not (tmp_path / "run" / "adapter").exists()  # nothing trained
    missing = _cli("eval", "--model", str(tiny_model_dir), str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert missing.returncode == 2 and "nope.yaml not found" in missing.stderr


def test_predict_answers_end_at_the_task_stop_strings(tmp_path, tokenizer, monkeypatch, capsys):
    import mtpeft.cli.predict as predict_cli
    from mtpeft.cli import main
    from mtpeft.training.run_config import run_config_from_dict

    class ScriptedRun(ScriptedModel):
        tasks = ["copy", "parity"]

        def eval(self):
            return self

        def task_index(self, task):
            return self.tasks.index(task)

    raw = toy_run_config(tmp_path, "unused-model")
    raw["tasks"][1]["stop"] = [" because"]
    cfg = run_config_from_dict(raw)
    model = ScriptedRun(tokenizer, " yes because 4 is even\nQ: next")
    monkeypatch.setattr(predict_cli, "load_run", lambda run_dir: (cfg, tokenizer, model))
    assert main(["predict", "run", "--task", "copy", "Is 4 even?\nA:"]) == 0
    assert capsys.readouterr().out.strip() == "'Is 4 even?\\nA:' -> 'yes because 4 is even'"  # one-line targets
    assert main(["predict", "run", "--task", "parity", "Is 4 even?\nA:"]) == 0
    assert capsys.readouterr().out.strip() == "'Is 4 even?\\nA:' -> 'yes'"  # the task's own stop strings
