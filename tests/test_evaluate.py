"""evaluate(): generation and option log-likelihood scoring, metrics, EvalResult tables and files."""

from __future__ import annotations

import json
import math
import string
import types
from pathlib import Path

import pytest
import torch

from mtpeft.data.tasks import Example, TaskSpec
from mtpeft.evaluation import EvalResult, compare_table, evaluate, generate_predictions, score_options


def char_tokenizer():  # noqa: ANN201
    """One token per character; <pad>=0 (unset as pad), <s>=1 (prepended), </s>=2, <unk>=3."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in sorted(set(string.printable)):
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tok():  # noqa: ANN201
    return char_tokenizer()


class FakeLM(torch.nn.Module):
    """A model whose outputs the test controls.

    forward: the same logits (``bias``) at every position, so option log-likelihoods are known.
    generate: appends ``answers[prompt]`` + EOS + junk (which must be cut), right-padded with pad id.
    """

    def __init__(self, tokenizer, answers: dict[str, str], favored: str = "") -> None:  # noqa: ANN001
        super().__init__()
        self.tok = tokenizer
        self.answers = answers
        self.weight = torch.nn.Parameter(torch.zeros(1))
        bias = torch.zeros(len(tokenizer))
        for c in favored:
            bias[tokenizer.convert_tokens_to_ids(c)] = 3.0
        self.register_buffer("bias", bias)
        self.forward_task_ids: list[list[int]] = []
        self.generate_calls: list[dict] = []

    def forward(self, input_ids, attention_mask=None, task_ids=None):  # noqa: ANN001, ANN201
        self.forward_task_ids.append(task_ids.tolist())
        b, n = input_ids.shape
        return types.SimpleNamespace(logits=self.bias.expand(b, n, -1).clone())

    def generate(self, input_ids, attention_mask, task_ids, **kw):  # noqa: ANN001, ANN003, ANN201
        self.generate_calls.append(
            {
                "task_ids": task_ids.tolist(),
                "input_ids": input_ids.clone(),
                "attention_mask": attention_mask.clone(),
                **kw,
            }
        )
        eos, pad = kw["eos_token_id"], kw["pad_token_id"]
        rows = []
        for r in range(input_ids.shape[0]):
            prompt = self.tok.decode(
                input_ids[r][attention_mask[r].bool()].tolist(), skip_special_tokens=True
            )
            new = self.tok(self.answers[prompt], add_special_tokens=False)["input_ids"] + [eos]
            new += self.tok("JUNK", add_special_tokens=False)["input_ids"]
            rows.append(new[: kw["max_new_tokens"]])
        width = max(len(r) for r in rows)
        new_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
        return torch.cat([input_ids, new_ids], dim=1)


def gen_task() -> tuple[TaskSpec, list[Example]]:
    spec = TaskSpec(name="add", source="builtin:arithmetic", prompt="{a}+{b}=", target=" {answer}")
    exs = [
        Example("add", p, " " + a, label=a)
        for p, a in [("1+1=", "2"), ("10+10=", "20"), ("2+3=", "5"), ("7+7=", "14")]
    ]
    return spec, exs


def cls_task() -> tuple[TaskSpec, list[Example]]:
    spec = TaskSpec(
        name="yn",
        source="x.tsv",
        type="classification",
        target=" {label}",
        labels=["no", "yes"],
        metric="accuracy",
        extra_metrics=["f1", "mcc"],
    )
    labels = ["yes", "yes", "no", "yes"]
    exs = [
        Example("yn", f"Q{i}?", " " + lab, ["no", "yes"], lab, option_targets=[" no", " yes"])
        for i, lab in enumerate(labels)
    ]
    return spec, exs


def test_generation_metric_order_eos_cut_and_task_ids(tok) -> None:  # noqa: ANN001
    spec, exs = gen_task()
    answers = {"1+1=": " 2", "10+10=": " 20", "2+3=": " 6", "7+7=": " 14"}  # one wrong
    model = FakeLM(tok, answers)
    res = evaluate(
        model, tok, [(spec, exs)], ["other", "add"], batch_size=2, max_new_tokens=10, progress=False
    )
    assert res.metrics["add"] == {"exact_match": 0.75, "n": 4}
    assert [p["prediction"] for p in res.predictions] == [" 2", " 20", " 6", " 14"]  # input order, junk cut
    assert [p["correct"] for p in res.predictions] == [True, True, False, True]
    assert len(model.generate_calls) == 2  # ceil(4 / 2) batches, prompts sorted by length
    call = model.generate_calls[1]  # "7+7=" with "10+10="
    assert set(call["task_ids"]) == {1} and call["do_sample"] is False and call["max_new_tokens"] == 10
    assert call["eos_token_id"] == 2 and call["pad_token_id"] == 2  # no pad token: EOS pads
    # left padding: the shorter prompts end at the right edge, padding is masked out
    mask = call["attention_mask"]
    assert (mask[:, -1] == 1).all() and (mask.sum(1) < mask.shape[1]).any()
    assert res.macro == res.micro == pytest.approx(0.75)


def test_max_new_tokens_truncates_generation(tok) -> None:  # noqa: ANN001
    spec, exs = gen_task()
    model = FakeLM(tok, {e.prompt: " " + e.label + "0" for e in exs})
    preds = generate_predictions(model, tok, exs, 0, max_new_tokens=2)
    assert preds == [" " + e.label[:1] for e in exs]


def test_option_loglik_scoring_known_logits(tok) -> None:  # noqa: ANN001
    spec, exs = cls_task()
    model = FakeLM(tok, {}, favored="yes")  # " yes" beats " no" at every position
    res = evaluate(model, tok, [(spec, exs)], ["yn"], batch_size=3, progress=False)
    assert [p["prediction"] for p in res.predictions] == ["yes"] * 4
    m = res.metrics["yn"]
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(2 * 0.75 * 1.0 / 1.75)  # binary F1 of "yes": P=3/4, R=1
    assert m["mcc"] == 0.0 and m["n"] == 4
    # the summed log-probabilities are exactly those of the fixed logits
    lp = torch.log_softmax(model.bias, -1)
    ids = {c: tok.convert_tokens_to_ids(c) for c in " noyes"}
    expect_no = float(lp[ids[" "]] + lp[ids["n"]] + lp[ids["o"]])
    expect_yes = float(lp[ids[" "]] + lp[ids["y"]] + lp[ids["e"]] + lp[ids["s"]])
    assert res.predictions[0]["option_logprobs"] == pytest.approx([expect_no, expect_yes], abs=1e-5)
    assert all(t == [0] * len(t) for t in model.forward_task_ids)
    assert sum(len(t) for t in model.forward_task_ids) == 8  # 4 examples x 2 options


def test_multiple_choice_per_example_options(tok) -> None:  # noqa: ANN001
    spec = TaskSpec(name="mc", source="x.jsonl", type="multiple_choice", target=" {a}", options_field="o")
    exs = [
        Example("mc", "Pick:", " zz", ["ab", "zz"], "zz", option_targets=[" ab", " zz"]),
        Example("mc", "Pick:", " ab", ["ab", "zz", "qq"], "ab", option_targets=[" ab", " zz", " qq"]),
    ]
    model = FakeLM(tok, {}, favored="z")
    res = evaluate(model, tok, [(spec, exs)], ["mc"], progress=False)
    assert [p["prediction"] for p in res.predictions] == ["zz", "zz"]
    assert res.score("mc") == pytest.approx(0.5)


def test_evaluate_errors_and_mode_restored(tok) -> None:  # noqa: ANN001
    spec, exs = gen_task()
    model = FakeLM(tok, {e.prompt: " " + e.label for e in exs})
    with pytest.raises(ValueError, match=r"task 'add' is not in task_names \['x'\]"):
        evaluate(model, tok, [(spec, exs)], ["x"], progress=False)
    model.train()
    with pytest.warns(UserWarning, match="no examples"):
        res = evaluate(model, tok, [(spec, exs), (cls_task()[0], [])], ["add", "yn"], progress=False)
    assert model.training and list(res.metrics) == ["add"]


def test_progress_bar(tok, capsys) -> None:  # noqa: ANN001
    spec, exs = gen_task()
    model = FakeLM(tok, {e.prompt: " " + e.label for e in exs})
    evaluate(model, tok, [(spec, exs)], ["add"], progress=True)
    assert "evaluate" in capsys.readouterr().err
    evaluate(model, tok, [(spec, exs)], ["add"], progress=False)
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------- tiny real model


class IgnoreTaskIds(torch.nn.Module):
    """Test-only wrapper: a plain HF causal LM that accepts and ignores task_ids."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, task_ids=None, **kw):  # noqa: ANN001, ANN003, ANN201
        return self.model(**kw)

    def generate(self, task_ids=None, **kw):  # noqa: ANN001, ANN003, ANN201
        return self.model.generate(**kw)


@pytest.fixture(scope="module")
def tiny_llama(tok):  # noqa: ANN001, ANN201
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return IgnoreTaskIds(LlamaForCausalLM(cfg).eval())


def test_batched_generation_equals_unbatched(tok, tiny_llama) -> None:  # noqa: ANN001
    exs = [Example("t", p, " x") for p in ["a", "hello there", "abc", "a much longer prompt here"]]
    batched = generate_predictions(tiny_llama, tok, exs, 0, batch_size=4, max_new_tokens=6)
    single = [generate_predictions(tiny_llama, tok, [e], 0, batch_size=1, max_new_tokens=6)[0] for e in exs]
    assert batched == single
    assert all(len(p) <= 6 for p in batched)


def test_generation_stops_at_the_stop_string_with_the_same_answers(tok, tiny_llama, monkeypatch) -> None:  # noqa: ANN001
    """Rows end once they hold a stop string, and the batch once all have: the answers equal those of generating
    to the token budget and cutting, in fewer new tokens."""
    from mtpeft.evaluation import generation

    exs = [Example("t", p, " x") for p in ["a", "hello there", "abc", "a much longer prompt here"]]
    budget = 40
    to_budget = [generate_predictions(tiny_llama, tok, [e], 0, batch_size=1, max_new_tokens=budget)[0] for e in exs]
    # the third character of every row's continuation as the stop strings: each row holds one within 3 tokens
    stop = sorted({text[2] for text in to_budget if len(text) > 2})
    assert stop, to_budget
    widths = []
    real_generate = tiny_llama.generate

    def spy(**kw):  # noqa: ANN003, ANN202
        out = real_generate(**kw)
        widths.append(out.shape[1] - kw["input_ids"].shape[1])
        return out

    monkeypatch.setattr(tiny_llama, "generate", spy)
    early = generate_predictions(tiny_llama, tok, exs, 0, batch_size=4, max_new_tokens=budget, stop=stop)
    monkeypatch.setattr(generation, "early_stop_kwargs", lambda tokenizer, stop: {})
    late = generate_predictions(tiny_llama, tok, exs, 0, batch_size=4, max_new_tokens=budget, stop=stop)
    assert early == late
    assert widths[0] < widths[1] == budget


def test_option_scores_match_manual_forward(tok, tiny_llama) -> None:  # noqa: ANN001
    exs = [
        Example("t", "Is it?", " yes", ["no", "yes"], "yes", option_targets=[" no", " yes"]),
        Example("t", "Longer question here?", " no", ["no", "yes"], "no", option_targets=[" no", " yes"]),
    ]
    scores = score_options(tiny_llama, tok, exs, 0, batch_size=3)
    for ex, sc in zip(exs, scores):
        for opt, got in zip(ex.option_targets, sc):
            p = tok(ex.prompt)["input_ids"]
            o = tok(opt, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = tiny_llama(input_ids=torch.tensor([p + o])).logits[0]
            lp = torch.log_softmax(logits.float(), -1)
            want = sum(float(lp[len(p) - 1 + k, t]) for k, t in enumerate(o))
            assert got == pytest.approx(want, abs=1e-4)


# -------------------------------------------------------------------------------------- EvalResult


def make_result(scores: dict[str, tuple[float, int]]) -> EvalResult:
    return EvalResult(
        {t: {"exact_match": s, "n": n} for t, (s, n) in scores.items()}, {t: "exact_match" for t in scores}
    )


def test_macro_micro_and_tables() -> None:
    res = make_result({"a": (0.5, 10), "b": (1.0, 30)})
    assert res.macro == pytest.approx(0.75) and res.micro == pytest.approx((5 + 30) / 40)
    table = res.format_table()
    lines = table.splitlines()
    assert lines[0].split() == ["task", "metric", "score", "%", "n"]
    assert lines[2].split() == ["a", "exact_match", "50.0", "10"]
    assert lines[-2].split() == ["macro", "-", "75.0", "2"]
    assert lines[-1].split() == ["micro", "-", "87.5", "40"]
    md = res.format_table(markdown=True).splitlines()
    assert md[0] == "| task | metric | score % | n |" and md[2] == "| a | exact_match | 50.0 | 10 |"
    empty = EvalResult({}, {})
    assert math.isnan(empty.macro) and math.isnan(empty.micro)


def test_compare_table() -> None:
    before = make_result({"a": (0.25, 4), "b": (0.5, 4)})
    after = make_result({"a": (0.75, 4), "c": (1.0, 2)})
    rows = {
        line.split()[0]: line.split()
        for line in compare_table(before, after).splitlines()[2:]
        if line[0] != "-"
    }
    assert rows["a"] == ["a", "exact_match", "25.0", "75.0", "+50.0"]
    assert rows["c"] == ["c", "exact_match", "-", "100.0", "-"]
    assert rows["b"] == ["b", "exact_match", "50.0", "-", "-"]
    assert rows["macro"][2:] == ["37.5", "87.5", "+50.0"]


def test_save_and_load(tmp_path: Path, tok) -> None:  # noqa: ANN001
    spec, exs = gen_task()
    res = evaluate(
        FakeLM(tok, {e.prompt: " " + e.label for e in exs}), tok, [(spec, exs)], ["add"], progress=False
    )
    out = res.save(tmp_path / "eval")
    data = json.loads((out / "metrics.json").read_text())
    assert data["tasks"]["add"] == {"exact_match": 1.0, "n": 4} and data["macro"] == 1.0
    assert (out / "metrics.md").read_text().startswith("| task | metric | score % | n |")
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and set(preds[0]) >= {"task", "prompt", "prediction", "reference", "correct"}
    again = EvalResult.load(out)
    assert again.metrics == res.metrics and again.macro == res.macro and len(again.predictions) == 4
