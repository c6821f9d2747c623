"""Parity with lm-evaluation-harness: the same local tasks scored by mtpeft's ``evaluate`` and by lm-eval.

lm-eval runs its ``hf`` model (HFLM) on a tiny random Llama saved to a temporary folder, bare and with
``peft=`` on mtpeft's PEFT export of a LoRA adapter, over task YAMLs that read local JSON files: a generation
task (``generate_until`` with the same stop strings as the mtpeft task) and a multiple-choice task (option
log-likelihood). Both must give the same per-example answers and log-likelihoods, and so the same scores.
Offline; skipped where lm-eval is not installed (``pip install -c constraints.txt 'lm-eval==0.4.13'``, part of
the ``dev`` extra).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import perturb_adapters

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -c constraints.txt "
                              "'lm-eval==0.4.13'): the parity test with lm-evaluation-harness is skipped")

from mtpeft.data.spec import TaskSpec  # noqa: E402
from mtpeft.data.tasks import load_task  # noqa: E402
from mtpeft.evaluation import evaluate, generate_predictions  # noqa: E402

STOP = ["\n", "e"]  # a newline (the default of one-line targets) and a letter a random model writes often
MAX_NEW_TOKENS = 5
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "tree", "fish", "book", "moon", "star", "rain"]


def _generation_records(answers: list[str] | None = None) -> list[dict]:
    rows = [{"question": f"Say a word after {a} and {b}", "answer": "x"} for a, b in zip(WORDS, WORDS[3:] + WORDS)]
    if answers is not None:
        for row, answer in zip(rows, answers):
            row["answer"] = answer
    return rows


def _choice_records() -> list[dict]:
    rows = [{"question": f"Which is like {w}?", "choices": [WORDS[(i + 1) % 12], WORDS[(i + 5) % 12], w]}
            for i, w in enumerate(WORDS)]
    return [{**row, "answer": row["choices"][i % 3]} for i, row in enumerate(rows)]


def _write(folder, name: str, rows: list[dict]):
    path = folder / f"{name}.json"
    path.write_text(json.dumps(rows))
    return path


def _specs(gen_file, mc_file) -> list[TaskSpec]:
    return [TaskSpec(name="gen", source=str(gen_file), eval_source=str(gen_file), prompt="Q: {question}\nA:",
                     target=" {answer}", stop=STOP),
            TaskSpec(name="mc", source=str(mc_file), eval_source=str(mc_file), type="multiple_choice",
                     prompt="Q: {question}\nA:", target=" {answer}", options_field="choices")]


def _task_yamls(folder, gen_file, mc_file) -> None:
    """lm-eval tasks over the same files and templates; exact match compared as mtpeft normalizes answers."""
    common = {"dataset_path": "json", "test_split": "train", "doc_to_text": "Q: {{question}}\nA:"}
    gen = {**common, "task": "parity_gen", "dataset_kwargs": {"data_files": {"train": str(gen_file)}},
           "output_type": "generate_until", "doc_to_target": "{{answer}}",
           "generation_kwargs": {"until": STOP, "max_gen_toks": MAX_NEW_TOKENS, "do_sample": False},
           "filter_list": [{"name": "none", "filter": [{"function": "remove_whitespace"},
                                                        {"function": "take_first"}]}],
           "metric_list": [{"metric": "exact_match", "ignore_case": True, "regexes_to_ignore": [r"\.$"]}]}
    mc = {**common, "task": "parity_mc", "dataset_kwargs": {"data_files": {"train": str(mc_file)}},
          "output_type": "multiple_choice", "doc_to_choice": "{{choices}}",
          "doc_to_target": "{{choices.index(answer)}}", "metric_list": [{"metric": "acc"}]}
    for cfg in (gen, mc):
        (folder / f"{cfg['task']}.yaml").write_text(json.dumps(cfg))  # JSON is YAML


def _lm_eval(folder, model_dir, peft_dir=None) -> dict:
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    args = {"pretrained": str(model_dir), "batch_size": 1, "device": "cpu", "dtype": "float32"}
    lm = HFLM(**args, **({"peft": str(peft_dir)} if peft_dir else {}))
    out = lm_eval.simple_evaluate(model=lm, tasks=["parity_gen", "parity_mc"], num_fewshot=0, log_samples=True,
                                  task_manager=TaskManager(include_path=str(folder)), bootstrap_iters=0)
    samples = {t: sorted(s, key=lambda r: r["doc_id"]) for t, s in out["samples"].items()}
    return {"gen": out["results"]["parity_gen"]["exact_match,none"], "mc": out["results"]["parity_mc"]["acc,none"],
            "gen_answers": [s["filtered_resps"][0] for s in samples["parity_gen"]],
            "mc_logprobs": [[float(r[0][0]) for r in s["resps"]] for s in samples["parity_mc"]]}


def _mtpeft(model, tokenizer, specs) -> dict:
    tasks = [(spec, load_task(spec).eval) for spec in specs]
    result = evaluate(model, tokenizer, tasks, [s.name for s in specs], batch_size=4,
                      max_new_tokens=MAX_NEW_TOKENS, progress=False)
    gen = [(spec, exs) for spec, exs in tasks if spec.name == "gen"]
    uncut = generate_predictions(model, tokenizer, gen[0][1], 0, max_new_tokens=MAX_NEW_TOKENS) if gen else []
    return {"gen": result.metrics.get("gen", {}).get("exact_match"), "mc": result.score("mc"), "uncut": uncut,
            "result": result,
            "gen_answers": [p["prediction"].strip() for p in result.predictions if p["task"] == "gen"],
            "mc_logprobs": [p["option_logprobs"] for p in result.predictions if p["task"] == "mc"]}


def _score_both(tmp_path, name, model, tokenizer, model_dir, peft_dir=None) -> tuple[dict, dict]:
    """Score with mtpeft once to pick gold answers that half the generations match (a score that says something),
    then score the final files with both."""
    folder = tmp_path / name
    folder.mkdir()
    mc_file = _write(folder, "mc", _choice_records())
    first = _mtpeft(model, tokenizer, _specs(_write(folder, "gen", _generation_records()), mc_file))
    answers = [a if (i % 2 == 0 and a) else "zzz" for i, a in enumerate(first["gen_answers"])]
    gen_file = _write(folder, "gen", _generation_records(answers))
    _task_yamls(folder, gen_file, mc_file)
    return _mtpeft(model, tokenizer, _specs(gen_file, mc_file)), _lm_eval(folder, model_dir, peft_dir)


def _assert_same(ours: dict, theirs: dict) -> None:
    assert ours["gen_answers"] == theirs["gen_answers"]
    assert len(set(ours["gen_answers"])) > 3  # answers that differ, so that equal lists say something
    assert not any(s in a for a in ours["gen_answers"] for s in STOP)
    assert any(full.strip() != cut and full.startswith(cut) for full, cut in zip(ours["uncut"], ours["gen_answers"]))
    torch.testing.assert_close(torch.tensor(ours["mc_logprobs"]), torch.tensor(theirs["mc_logprobs"]),
                               atol=1e-4, rtol=1e-5)
    assert ours["gen"] == pytest.approx(theirs["gen"]) and 0 < ours["gen"] < 1
    assert ours["mc"] == pytest.approx(sum(p["correct"] for p in ours["result"].predictions if p["task"] == "mc") / 12)
    assert ours["mc"] == pytest.approx(theirs["mc"])


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2_dir):
    """A tiny random Llama with the SmolLM2 tokenizer, initialized wide enough that its greedy answers differ from
    prompt to prompt (at the default scale every answer is ':::::') and run into the stop strings."""
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, initializer_range=0.3)
    folder = tmp_path_factory.mktemp("parity-llama")
    tf.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from mtpeft.base_models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def test_base_model_scores_equal_lm_eval(tmp_path, tiny_model_dir, tokenizer):
    from mtpeft.base_models import load_base_model
    from mtpeft.bench.scoring import FixedTaskIds

    bare = FixedTaskIds(load_base_model(str(tiny_model_dir)).eval(), drop=True)  # what `mtpeft eval --model` runs
    ours, theirs = _score_both(tmp_path, "base", bare, tokenizer, tiny_model_dir)
    _assert_same(ours, theirs)


def test_exported_adapter_scores_equal_lm_eval_with_peft(tmp_path, tiny_model_dir, tokenizer):
    import mtpeft
    from mtpeft.base_models import load_base_model

    model = mtpeft.get_mt_model(load_base_model(str(tiny_model_dir)),
                                {"method": "lora", "tasks": ["gen", "mc"], "r": 4, "alpha": 8})
    perturb_adapters(model, std=0.5)
    model.eval()
    report = model.export_peft(tmp_path / "peft")
    assert report["exact"]
    ours, theirs = _score_both(tmp_path, "adapter", model, tokenizer, tiny_model_dir, tmp_path / "peft")
    _assert_same(ours, theirs)
    from mtpeft.bench.scoring import FixedTaskIds

    bare = FixedTaskIds(load_base_model(str(tiny_model_dir)).eval(), drop=True)
    spec = _specs(tmp_path / "adapter" / "gen.json", tmp_path / "adapter" / "mc.json")[1]
    bare_logprobs = _mtpeft(bare, tokenizer, [spec])["mc_logprobs"]
    assert not torch.allclose(torch.tensor(bare_logprobs), torch.tensor(theirs["mc_logprobs"]), atol=1e-2)
