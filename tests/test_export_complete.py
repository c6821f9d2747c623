"""Complete exports (#16): modules_to_save in PEFT's format with a measured "exact", `mtpeft export --rank` for
input-routed methods with calibration batches from the run's training data, and `mtpeft --version`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import TASKS, perturb_adapters, tiny_batch, toy_run_config

import mtpeft
from mtpeft.cli import main
from mtpeft.errors import MergeError


def _tiny_llama(tied: bool) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            tie_word_embeddings=tied)
    return tf.LlamaForCausalLM(config).eval()


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert f"mtpeft {mtpeft.__version__}" in capsys.readouterr().out


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("method", ["lora", "mtl_lora"])
def test_modules_to_save_are_exported_in_peft_format_and_peft_reproduces_the_logits(tmp_path, tied, method):
    from peft import PeftModel
    from safetensors.torch import load_file

    base = _tiny_llama(tied)
    original = copy.deepcopy(base)  # the base as PEFT users have it: without the trained lm_head
    model = mtpeft.get_mt_model(base, {"method": method, "tasks": TASKS, "r": 4, "modules_to_save": ["lm_head"]})
    perturb_adapters(model)  # lm_head (and with it a tied embedding) trained too
    model.eval()
    task = "rte" if method == "mtl_lora" else None
    report = model.export_peft(tmp_path / "peft", task=task)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert "lm_head" in config["modules_to_save"] and "base_model.model.lm_head.weight" in tensors
    if tied:  # PEFT keeps its own copy of each saved module, so the tied embedding is saved as well
        assert "base_model.model.model.embed_tokens.weight" in tensors
    written = json.loads((tmp_path / "peft" / "mtpeft_export.json").read_text())
    assert written["exact"] is True and written["peft_check"]["checked"] is True
    assert written["peft_check"]["max_logit_diff"] < 1e-4 and report["peft_check"] == written["peft_check"]
    ids, mask, _ = tiny_batch()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, task_ids=task).logits
        theirs = PeftModel.from_pretrained(original, str(tmp_path / "peft")).eval()(input_ids=ids,
                                                                                    attention_mask=mask).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_an_export_that_peft_does_not_reproduce_is_refused(tmp_path, monkeypatch):
    import mtpeft.io.export as export

    model = mtpeft.get_mt_model(_tiny_llama(False), {"method": "lora", "r": 4, "modules_to_save": ["lm_head"]})
    perturb_adapters(model)
    monkeypatch.setattr(export, "saved_modules", lambda model: [])  # the export as it was: lm_head left out
    with pytest.raises(MergeError, match="logits differ"):
        model.export_peft(tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize("batches", [None, 1])
def test_cli_rank_export_of_an_input_routed_method_calibrates_on_the_run_data(tmp_path, tiny_model_dir, capsys,
                                                                             batches):
    from mtpeft.training.run_config import run_config_from_dict
    from mtpeft.training.trainer import train

    cfg = toy_run_config(tmp_path, tiny_model_dir, method="hydralora", steps=2, save_every=2)
    train(run_config_from_dict(cfg), progress=False)
    out = tmp_path / "export"
    argv = ["export", cfg["output_dir"], "--task", "copy", "--rank", "2", "--out", str(out)]
    argv += [] if batches is None else ["--calibration-batches", str(batches)]
    assert main(argv) == 0
    report = json.loads((out / "mtpeft_export.json").read_text())
    assert report["exact"] is False and report["rank"] == 2
    assert report["relative_error"] >= 0 and report["calibration_tokens"] > 0
    assert report["calibration_batches"] == (batches or 8)
    assert "relative_error" in capsys.readouterr().out
    assert Path(out / "adapter_model.safetensors").is_file()


def test_a_saved_lm_head_of_a_tied_base_loads_back(tmp_path):
    """SmolLM2 ties lm_head to the embedding; a run with modules_to_save: [lm_head] must open for export."""
    model = mtpeft.get_mt_model(_tiny_llama(True), {"method": "lora", "r": 4, "modules_to_save": ["lm_head"]})
    perturb_adapters(model)
    model.save_pretrained(tmp_path / "adapter")
    loaded = mtpeft.MTModel.from_pretrained(_tiny_llama(True), tmp_path / "adapter")
    for key, value in model.adapter_state_dict().items():
        torch.testing.assert_close(loaded.adapter_state_dict()[key], value, msg=key)
