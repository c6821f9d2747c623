"""The ``peft_lora`` bench baseline: PEFT adapts the same linears as mtpeft's LoRA, and its plain training loop on the
same batches gives the same losses and, from the same initial A, the same adapter weights."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, toy_run_config

from mtpeft.bench.peft_baseline import (
    build_peft_model,
    causal_lm_loss,
    peft_adapted_names,
    train_peft,
    training_data,
)
from mtpeft.model import get_mt_model
from mtpeft.registry import config_from_dict
from mtpeft.training.run_config import method_config_for, run_config_from_dict


@pytest.mark.parametrize("spec", [
    {},  # all-linear
    {"layers_to_transform": [1]},  # what the bench's top_layers becomes
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": r".*\.mlp\..*"},
    {"exclude_modules": ["o_proj", "down_proj"]},
    {"use_rslora": True, "init": "gaussian", "alpha": 5.0},
])
def test_peft_adapts_the_same_linears_with_the_same_scale(spec: dict) -> None:
    cfg = config_from_dict({"method": "lora", "r": 4, "alpha": 8.0, "tasks": ["a", "b"], **spec})
    mt = get_mt_model(tiny_model("llama"), cfg)
    peft = build_peft_model(tiny_model("llama"), cfg)
    assert set(peft_adapted_names(peft)) == set(mt.adapter_layers)
    inner = peft.get_base_model()
    for name, layer in mt.adapter_layers.items():
        assert inner.get_submodule(name).scaling["default"] == pytest.approx(layer.scale, rel=1e-12)
    assert sum(p.numel() for p in peft.parameters() if p.requires_grad) == mt.num_trainable_parameters()


def test_loss_is_the_token_mean_over_labelled_positions() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 5, -100, -100]])
    # position t predicts label t + 1: rows hold 3 and 2 labelled next tokens
    terms = [-torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]] for b in range(2) for t in range(1, 5)
             if labels[b, t] != -100]
    assert len(terms) == 5
    torch.testing.assert_close(causal_lm_loss(logits, labels), torch.stack(terms).mean(), rtol=1e-12, atol=0)


def test_training_matches_mtpeft_lora_on_the_same_batches(tmp_path: Path, tiny_model_dir: Path, one_thread) -> None:
    """Dropout 0 and the same initial A: the first-step loss is the base model's on the first batch for both (B = 0),
    the later losses and the adapter weights after a few steps agree to float32 rounding."""
    from mtpeft.base_models import load_run_base_model, load_tokenizer
    from mtpeft.training.trainer import MultiTaskTrainer

    raw = toy_run_config(tmp_path, tiny_model_dir, steps=4, grad_accum=2, save_every=0, weight_decay=0.01,
                         warmup_ratio=0.25, max_grad_norm=0.5)  # warmup, decay and clipping all take part
    raw["method"]["dropout"] = 0.0
    cfg = run_config_from_dict(raw)
    data = training_data(cfg, load_tokenizer(cfg.model.name))
    method_cfg = method_config_for(cfg, data.task_names)

    # the first optimizer step's two micro-batches, scored by the plain base model (its own HF loss)
    fresh = training_data(cfg, load_tokenizer(cfg.model.name))
    base = load_run_base_model(cfg.model)
    with torch.no_grad():
        batches = [fresh.next_batch(), fresh.next_batch()]
        base_losses = [float(base(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                  labels=b["labels"]).loss) for b in batches]

    torch.manual_seed(5)
    mt = get_mt_model(load_run_base_model(cfg.model), method_cfg)
    initial_a = {name: layer.lora_A.detach().clone() for name, layer in mt.adapter_layers.items()}
    trainer = MultiTaskTrainer(cfg, model=mt, progress=False)
    result = trainer.train()

    peft = build_peft_model(load_run_base_model(cfg.model), method_cfg)
    inner = peft.get_base_model()
    with torch.no_grad():
        for name, a in initial_a.items():
            inner.get_submodule(name).lora_A["default"].weight.copy_(a)
    history = train_peft(peft, cfg, data, torch.device("cpu"))

    assert trainer.sampler.state_dict() == data.sampler.state_dict()  # the same stream, drawn as far
    assert len(history) == len(result.history) == 4
    # step 1 (grad_accum 2) is the mean of two micro-batch losses, both at B = 0: the base model's
    first = sum(base_losses) / 2
    assert result.history[0]["loss"] == pytest.approx(first, rel=1e-6)  # float32 sums in other orders: a few ulps
    assert history[0]["loss"] == pytest.approx(first, rel=1e-6)
    mt_losses = [r["loss"] for r in result.history]
    assert [r["loss"] for r in history] == pytest.approx(mt_losses, rel=1e-5)
    assert [r["lr"] for r in history] == pytest.approx([r["lr"] for r in result.history], rel=1e-12)

    # Adam moves an entry by about lr per step whatever the gradient's scale, and passes the gradients' relative
    # float32 rounding (the two implementations sum in other orders: ~sqrt(terms) * 1.2e-7, about 1e-6) on to the
    # updates about unchanged. Measured: the disagreement is 4e-6 of the distance trained (largest entry 3e-6 after
    # 4 steps at lr 1e-2). The bounds leave >10x room; training without gradient clipping gives 3e-3 (and 8e-5 on
    # an entry), another batch, scale or loss reduction more.
    entry_tol = 1e-3 * cfg.train.lr * cfg.train.steps
    diff_sq = moved_sq = moved_max = 0.0
    for name, layer in mt.adapter_layers.items():
        module = inner.get_submodule(name)
        for ours, theirs, start in ((layer.lora_A, module.lora_A["default"].weight, initial_a[name]),
                                    (layer.lora_B, module.lora_B["default"].weight, torch.zeros(()))):
            ours, theirs = ours.detach(), theirs.detach()
            torch.testing.assert_close(theirs, ours, rtol=0, atol=entry_tol)
            diff_sq += float(((theirs - ours) ** 2).sum())
            moved_sq += float(((ours - start) ** 2).sum())
            moved_max = max(moved_max, float((ours - start).abs().max()))
    assert moved_max > 100 * entry_tol  # training moved the adapters far beyond the bound: the check can fail
    assert (diff_sq / moved_sq) ** 0.5 < 1e-4


def test_plan_gives_peft_lora_the_lora_run_config(tmp_path: Path, tiny_model_dir: Path) -> None:
    from test_bench import _toy_suite

    from mtpeft.bench import BenchOptions, plan_runs

    suite = _toy_suite(tmp_path, tiny_model_dir)
    options = BenchOptions(methods=["lora", "peft_lora"], seeds=[0, 1], top_layers=1,
                           overrides=["methods.lora.dropout=0.2", "train.lr=3e-3"])
    runs = {(r.method, r.seed): r for r in plan_runs(suite, options, tmp_path / "b")}
    for seed in (0, 1):
        lora, peft = copy.deepcopy(runs["lora", seed].config), copy.deepcopy(runs["peft_lora", seed].config)
        assert lora.pop("output_dir") != peft.pop("output_dir")
        assert lora.pop("name") != peft.pop("name")
        assert lora == peft  # a methods.lora override reaches peft_lora too
    method = runs["peft_lora", 0].config["method"]
    assert method["method"] == "lora" and method["dropout"] == 0.2 and method["layers_to_transform"] == [1]
