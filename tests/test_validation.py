"""Bad input refused up front (issue #13, items 6-8): run-config values that train wrongly, task names with
control characters, a rank above a layer's width, null record fields, a damaged adapter, and over-long examples
found when the tasks are loaded (not when a batch samples them), under the policy of ``data.truncation``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import tiny_model, toy_run_config, write_jsonl
from safetensors.torch import load_file, save_file

import mtpeft
from mtpeft.config import ConfigError
from mtpeft.data.lengths import screen_lengths
from mtpeft.data.loaders import DataFormatError
from mtpeft.data.spec import Example, TaskData, TaskSpec, TaskSpecError
from mtpeft.data.tasks import load_task
from mtpeft.errors import AdapterLoadError, TruncationError
from mtpeft.training.run_config import RunConfigError, load_run_config, run_config_from_dict


# --- item 6: run-config values ----------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [
    ("train.max_grad_norm=-1", "train.max_grad_norm"),  # clipping to a negative norm: gradient ascent
    ("train.max_grad_norm=.nan", "train.max_grad_norm"),
    ("train.lr=.inf", "train.lr"),
    ("train.lr=.nan", "train.lr"),
    ("train.lr=0", "train.lr"),
    ("train.lr=-1e-4", "train.lr"),
    ("train.device=tpu9", "train.device"),
    ("train.device=cuda:1", "train.device"),  # accelerate picks the GPU per process; an index would be ignored
    ("train.keep_checkpoints=0", "train.keep_checkpoints"),  # used to keep every checkpoint
    ("train.keep_checkpoints=-1", "train.keep_checkpoints"),
    ("train.weight_decay=-0.1", "train.weight_decay"),
    ("train.weight_decay=.inf", "train.weight_decay"),
    ("train.warmup_ratio=-0.1", "train.warmup_ratio"),
    ("train.steps=0", "train.steps"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.seed=-1", "train.seed"),
    ("data.temperature=0", "data.temperature"),
    ("data.temperature=-2", "data.temperature"),
    ("data.temperature=.nan", "data.temperature"),
    ("data.max_train_per_task=-1", "data.max_train_per_task"),
    ("data.truncation=middle", "data.truncation"),
    ("data.max_length=1", "data.max_length"),
    ("method={method: lora, alpha: .inf}", "alpha"),  # an infinite scale: NaN from the first step
])
def test_bad_run_config_values_are_refused_naming_the_key(override, key):
    with pytest.raises(RunConfigError) as info:
        load_run_config(None, ["tasks=demo", override])
    message = str(info.value)
    assert key in message and "\n" not in message, message


@pytest.mark.parametrize("override, key, value", [
    ("train.max_grad_norm=0", "max_grad_norm", 0.0),  # 0 and null: no clipping (documented)
    ("train.max_grad_norm=null", "max_grad_norm", None),
    ("train.device=auto", "device", None),
    ("train.device=cpu", "device", "cpu"),
    ("train.device=cuda", "device", "cuda"),
    ("train.weight_decay=0", "weight_decay", 0.0),
    ("train.keep_checkpoints=1", "keep_checkpoints", 1),
    ("data.truncation=skip", None, None),
])
def test_sound_values_still_pass(override, key, value):
    cfg = load_run_config(None, ["tasks=demo", override])
    if key is not None:
        assert getattr(cfg.train, key) == value


@pytest.mark.parametrize("name", ["a\nb", "tab\there", "bell\x07", "esc\x1b[31m", "rtl\u202eoverride", "ls\u2028x"])
def test_task_names_with_control_characters_are_refused(name):
    with pytest.raises(TaskSpecError, match="control character"):
        TaskSpec(name=name, source="x.jsonl")
    with pytest.raises(ConfigError, match="control character"):
        mtpeft.LoRAConfig(tasks=[name])
    with pytest.raises(RunConfigError, match="control character"):
        run_config_from_dict({"tasks": ["demo"], "method": {"method": "mtl_lora", "tasks": ["ok", name]}})


def test_a_rank_above_a_layers_width_is_refused_naming_the_layer_and_shape():
    # the tiny Llama's k_proj is 32 -> 16 (2 key/value heads of 8)
    with pytest.raises(ConfigError) as info:
        mtpeft.get_mt_model(tiny_model(), mtpeft.LoRAConfig(r=20))
    message = str(info.value)
    assert "r=20" in message and "k_proj" in message and "out_features=16" in message, message
    mtpeft.get_mt_model(tiny_model(), mtpeft.LoRAConfig(r=16))  # the largest rank that fits every layer
    mtpeft.get_mt_model(tiny_model(), mtpeft.LoRAConfig(r=20, target_modules=["q_proj"]))  # 32 -> 32 fits


def test_a_rank_above_a_conv1d_width_is_refused():
    import transformers as tf

    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=4, n_positions=32))
    with pytest.raises(ConfigError, match=r"r=40 .*c_attn"):
        mtpeft.get_mt_model(gpt2, mtpeft.LoRAConfig(r=40, target_modules=["c_attn"]))


@pytest.mark.parametrize("row", [{"input": "2+2", "target": None}, {"input": None, "target": "4"}])
def test_a_null_record_field_a_template_uses_is_an_error_naming_file_and_line(tmp_path, row):
    rows = [{"input": f"{i}+{i}", "target": str(2 * i)} for i in range(5)]
    rows.insert(2, row)
    path = write_jsonl(tmp_path / "sums.jsonl", rows)
    with pytest.raises(DataFormatError) as info:
        load_task(TaskSpec(name="sums", source=str(path)))
    message = str(info.value)
    assert str(path) in message and "line 3" in message and "null" in message, message
    assert ("'target'" if row["target"] is None else "'input'") in message


# --- item 7: a damaged adapter ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_an_adapter_with_non_finite_weights_is_refused_naming_file_and_tensor(tmp_path, bad):
    folder = tmp_path / "adapter"
    mtpeft.get_mt_model(tiny_model(), mtpeft.LoRAConfig(r=4)).save_pretrained(folder)
    weights = folder / "adapter_model.safetensors"
    state = load_file(str(weights))
    key = sorted(k for k in state if k.endswith("lora_A"))[0]
    state[key][0, 0] = bad
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(AdapterLoadError) as info:
        mtpeft.MTModel.from_pretrained(tiny_model(), folder)
    message = str(info.value)
    assert str(weights) in message and key in message and "NaN or inf" in message and "\n" not in message


# --- item 8: every example's length, at load time -----------------------------------------------------------------
class CharTokenizer:
    """One token per character; BOS (1) is prepended when special tokens are asked for; EOS 2, pad 0. It takes
    one text at a time, as a hand-written tokenizer may."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0
    all_special_ids = [0, 1, 2]

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        if not isinstance(text, str):
            raise TypeError("one text at a time")
        return {"input_ids": ([1] if add_special_tokens else []) + [3 + ord(c) % 90 for c in text]}


def _task(name: str, prompts: list[str], target: str = "ab") -> tuple[TaskSpec, TaskData]:
    spec = TaskSpec(name=name, source=f"{name}.jsonl")
    train = [Example(name, p, target, meta={"source": f"/data/{name}.jsonl", "line": i + 1, "index": i})
             for i, p in enumerate(prompts)]
    return spec, TaskData(spec, train, [])


def test_screen_lengths_applies_each_policy_to_every_example():
    # max_length 12: BOS + prompt + target 'ab' + EOS = len(prompt) + 4
    prompts = ["x" * 8] * 41 + ["x" * 30] + ["x" * 8] * 3  # line 42 is too long
    tasks = [_task("t", prompts), _task("u", ["y" * 2] * 4)]
    with pytest.raises(TruncationError) as info:
        screen_lengths(tasks, CharTokenizer(), 12, "error")
    message = str(info.value)
    assert "/data/t.jsonl line 42" in message and "max_length=12" in message and "skip" in message, message
    with pytest.warns(UserWarning, match="left out"):
        kept, report = screen_lengths(tasks, CharTokenizer(), 12, "skip")
    assert [len(d.train) for _, d in kept] == [44, 4] and kept[1][1] is tasks[1][1]
    assert report["skipped"] == 1 and report["truncated"] == 0 and report["tasks"] == {"t": {"truncated": 0,
                                                                                            "skipped": 1}}
    with pytest.warns(UserWarning, match="cut to fit"):
        kept, report = screen_lengths(tasks, CharTokenizer(), 12, "left")
    assert [len(d.train) for _, d in kept] == [45, 4] and report["truncated"] == 1 and report["examples"] == 49
    _, report = screen_lengths(tasks, CharTokenizer(), 40, "error")
    assert report["truncated"] == report["skipped"] == 0 and report["tasks"] == {}


def test_screen_lengths_refuses_what_no_policy_can_cut():
    long_target = [_task("t", ["p"], target="z" * 20)]
    for policy in ("left", "right", "error"):
        with pytest.raises(TruncationError, match="target alone"):
            screen_lengths(long_target, CharTokenizer(), 12, policy)
    with pytest.raises(TruncationError, match="prompt alone"):
        screen_lengths([_task("t", ["x" * 20])], CharTokenizer(), 12, "right")
    with pytest.raises(DataFormatError, match="left none"):
        screen_lengths(long_target, CharTokenizer(), 12, "skip")


def test_screen_lengths_counts_as_the_collator_does(tiny_model_dir):
    """Batched tokenization gives the lengths the collator's one-example encoding gives."""
    import transformers as tf

    from mtpeft.data.collator import MultiTaskCollator, use_chat_template
    from mtpeft.data.lengths import example_lengths

    examples = [Example("t", p, t) for p, t in [("Q: 2+2?\nA:", " 4"), ("", " x"), ("  spaced  ", "tail "),
                                                 ("é ü 漢字", " ok"), ("a" * 300, " b")]]
    for chat in ("none", "auto"):  # SmolLM2's tokenizer has a chat template
        tokenizer = use_chat_template(tf.AutoTokenizer.from_pretrained(tiny_model_dir), chat)
        collator = MultiTaskCollator(tokenizer, ["t"], max_length=100_000)
        for ex, (n_prompt, n_target) in zip(examples, example_lengths(tokenizer, examples)):
            ids, labels = collator.encode(ex)
            assert len(ids) == n_prompt + n_target and sum(x != -100 for x in labels) == n_target, (chat, ex)


def _long_line_config(tmp_path: Path, model_dir: Path, truncation: str) -> dict:
    data = toy_run_config(tmp_path, model_dir, method="lora", steps=4, save_every=0)
    rows = [{"input": f"Repeat: w{i}", "target": f"w{i}"} for i in range(50)]
    rows[41]["input"] = "Repeat: " + "long " * 60  # line 42: far over max_length=32
    long_file = write_jsonl(tmp_path / "long.jsonl", rows)
    data["tasks"][0]["source"] = str(long_file)
    data["tasks"][0].pop("test_size")  # every record trains
    data["data"]["truncation"] = truncation
    return data


def test_an_over_long_example_stops_the_run_before_training_naming_file_and_line(tmp_path, tiny_model_dir,
                                                                                  monkeypatch):
    from mtpeft.training import trainer as trainer_module

    cfg = run_config_from_dict(_long_line_config(tmp_path, tiny_model_dir, "error"))
    loaded = []
    monkeypatch.setattr(trainer_module, "get_mt_model", lambda *a, **k: loaded.append(1))
    with pytest.raises(TruncationError) as info:
        trainer_module.MultiTaskTrainer(cfg, progress=False)
    message = str(info.value)
    assert f"{tmp_path / 'long.jsonl'} line 42" in message and "max_length=32" in message, message
    assert not loaded and not Path(cfg.output_dir).exists()  # before the model is built, nothing written


@pytest.mark.parametrize("policy, counted", [("skip", "skipped"), ("left", "truncated")])
def test_the_over_long_policy_is_counted_in_the_run_summary(tmp_path, tiny_model_dir, policy, counted):
    from mtpeft.training.trainer import train

    cfg = run_config_from_dict(_long_line_config(tmp_path, tiny_model_dir, policy))
    with pytest.warns(UserWarning, match="data.max_length=32"):
        result = train(cfg, progress=False)
    assert result.steps == 4
    lengths = json.loads((Path(cfg.output_dir) / "summary.json").read_text())["lengths"]
    assert lengths[counted] == 1 and lengths["policy"] == policy
    assert lengths["tasks"] == {"copy": {"truncated": 0, "skipped": 0, counted: 1}}
    assert lengths["examples"] == 50 + 32 - (policy == "skip")  # copy: all 50; parity: 40 less 8 for eval


def test_a_screened_run_resumes_with_the_same_examples(tmp_path, tiny_model_dir):
    from mtpeft.training.trainer import MultiTaskTrainer

    data = _long_line_config(tmp_path, tiny_model_dir, "skip")
    with pytest.warns(UserWarning):
        first = MultiTaskTrainer(run_config_from_dict(data), progress=False)
    with pytest.warns(UserWarning):
        again = MultiTaskTrainer(run_config_from_dict(data), progress=False)
    prompts = [[e.prompt for e in d.train] for _, d in first.tasks]
    assert prompts == [[e.prompt for e in d.train] for _, d in again.tasks] and len(prompts[0]) == 49
    assert first.sampler.state_dict() == again.sampler.state_dict()
