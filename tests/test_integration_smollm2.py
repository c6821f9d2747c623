"""Integration tests on the real SmolLM2-135M-Instruct and the real BBH data (skipped where absent)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import mtpeft
from mtpeft.base_models import load_base_model, load_tokenizer

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("smollm2")]


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Equal within fp32 arithmetic over 30 layers: the tolerance is relative to the largest logit, since the
    summation order (merged weights, PEFT's layer order, the thread count) changes the last bits at that scale."""
    torch.testing.assert_close(actual, expected, atol=rel * expected.abs().max().item(), rtol=0)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_base_model(str(smollm2_dir)).eval(), load_tokenizer(str(smollm2_dir))


def test_smollm2_identity_merge_and_peft_export(smollm2, tmp_path):
    from peft import PeftModel

    base, tokenizer = smollm2
    batch = tokenizer(["Q: not ( True ) and ( True ) is\nA:", "Q: Is 7 even?\nA:"], return_tensors="pt",
                      padding=True)
    with torch.no_grad():
        reference = base(**batch).logits
    cfg = mtpeft.MTLLoRAConfig(tasks=["a", "b"], r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    model = mtpeft.get_mt_model(copy.deepcopy(base), cfg).eval()
    with torch.no_grad():
        assert_logits_close(model(**batch, task_ids=[0, 1]).logits, reference, rel=1e-6)  # B = 0: the base exactly
        g = torch.Generator().manual_seed(0)
        for _, p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
        adapted = model(**batch, task_ids=["b", "b"]).logits
    assert (adapted - reference).abs().max() > 1e-3
    assert (adapted - reference).abs().max() > 100 * 2e-5 * reference.abs().max()  # far above the tolerance
    model.export_peft(tmp_path / "peft_b", task="b")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft_b")).eval()
    with torch.no_grad():
        assert_logits_close(peft_model(**batch).logits, adapted, rel=2e-5)
        merged = model.merge_and_unload(task="b")
        assert_logits_close(merged(**batch).logits, adapted, rel=2e-5)


def test_smollm2_learns_three_real_bbh_tasks(smollm2_dir, data_root, tmp_path):
    from mtpeft.training.run_config import run_config_from_dict
    from mtpeft.training.trainer import train

    cfg = run_config_from_dict({
        "name": "bbh3",
        "tasks": ["bbh:sports_understanding", "bbh:web_of_lies", "bbh:navigate"],
        "method": {"method": "mtl_lora", "r": 8, "alpha": 16, "layers_to_transform": list(range(24, 30))},
        "model": {"name": str(smollm2_dir)},
        "data": {"root": str(data_root), "max_length": 128, "max_eval_per_task": 16},
        "train": {"steps": 16, "batch_size": 8, "lr": 3e-3, "warmup_ratio": 0.1, "save_every": 0, "seed": 0,
                  "device": "cpu"},
        "eval": {"batch_size": 16, "max_new_tokens": 4, "before_training": True},
        "output_dir": str(tmp_path / "run"),
    })
    result = train(cfg, progress=False)
    before, after = result.eval_before, result.eval
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval"]["macro"] == pytest.approx(after.macro)
    for task in ["sports_understanding", "web_of_lies", "navigate"]:
        assert after.score(task) > before.score(task), (task, before.score(task), after.score(task))
