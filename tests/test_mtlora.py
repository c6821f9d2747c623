"""mtLoRA: block-level adapters (ffn / attn / both), fine-grained routing, the balance loss and both spectral
regularizers checked against hand computations, parameter counts at the paper's settings."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import TASKS, perturb_adapters, tiny_batch, tiny_model
from torch import nn

import mtpeft
from mtpeft.core.spectral import spectral_paper, spectral_released
from mtpeft.methods.hydralora import HydraLoRALinear
from mtpeft.methods.mtlora import BlockAdapter, spectral_due


def make(arch: str = "llama", **overrides):
    base = tiny_model(arch)
    cfg = {"method": "mtlora", "tasks": TASKS, "r": 4, "num_experts": 3, **overrides}
    return base, mtpeft.get_mt_model(copy.deepcopy(base), cfg)


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_initial_logits_equal_base_for_every_block_type(arch):
    ids, mask, _ = tiny_batch()
    base = tiny_model(arch)
    expected = logits(base, ids, mask)
    for block_type in ("ffn", "attn", "both"):
        model = mtpeft.get_mt_model(copy.deepcopy(base), {"method": "mtlora", "r": 4, "num_experts": 3,
                                                          "block_type": block_type, "routing_group_size": 8})
        kinds = sorted({m.kind for m in model.adapter_layers.values()})
        assert kinds == {"ffn": ["ffn"], "attn": ["attn"], "both": ["attn", "ffn"]}[block_type]
        torch.testing.assert_close(logits(model, ids, mask), expected, atol=1e-5, rtol=0)


def test_block_delta_is_fed_the_block_input_and_added_to_its_output():
    """Checks the forward against an explicit formula: Delta(u) = s sum_e Pi_e (group-expanded) * B_e A u."""
    _, model = make(block_type="both", routing_group_size=16)
    perturb_adapters(model)
    model.eval()
    ids, mask, _ = tiny_batch()
    record = {}

    def capture(module, args, kwargs, output):
        record[module] = (BlockAdapter.first_input(args, kwargs), output)  # positional or hidden_states=

    layers = list(model.adapter_layers.values())
    handles = [m.base_layer.register_forward_hook(capture, with_kwargs=True) for m in layers]
    wrapped = {}
    handles += [m.register_forward_hook(lambda mod, a, o: wrapped.__setitem__(mod, o))
                for m in model.adapter_layers.values()]
    logits(model, ids, mask)
    for h in handles:
        h.remove()
    for layer in model.adapter_layers.values():
        u, base_out = record[layer.base_layer]
        if layer.kind == "attn":
            assert isinstance(base_out, tuple)
            base_out, got = base_out[0], wrapped[layer][0]
        else:
            got = wrapped[layer]
        u = u.double()
        a, b, w = (t.detach().double() for t in (layer.lora_A, layer.lora_B, layer.lora_router))
        logit = (u @ w.T).reshape(*u.shape[:-1], 2, 3)  # d = 32, group size 16: G = 2 groups, E = 3 experts
        pi = torch.softmax(logit, -1)
        expected = torch.zeros_like(u)
        for e in range(3):
            expected += pi[..., e].repeat_interleave(16, -1) * (u @ a.T @ b[e].T)
        torch.testing.assert_close((got - base_out).double(), expected * layer.scale, atol=1e-5, rtol=1e-4)


def test_forward_backward_mixed_batch_and_router_weights_sum_to_one_per_token_and_group():
    _, model = make(block_type="both", routing_group_size=8, spectral_mode="paper")
    perturb_adapters(model)
    model.train()
    ids, mask, labels = tiny_batch()
    pis = []
    handles = [m.register_forward_pre_hook(lambda mod, args, kw: pis.append(
        mod.routing_weights(BlockAdapter.first_input(args, kw)).detach()), with_kwargs=True)
        for m in model.adapter_layers.values()]
    out = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=torch.tensor([0, 1, 2, 1]))
    for h in handles:
        h.remove()
    out.loss.backward()
    assert len(pis) == 4
    for pi in pis:
        assert pi.shape == (4, 7, 4, 3)
        torch.testing.assert_close(pi.sum(-1), torch.ones(4, 7, 4), atol=1e-6, rtol=0)
    for name, p in model.trainable_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert set(out.aux_losses) == {"balance", "spectral"}


def test_balance_loss_with_fine_grained_routing_matches_numpy():
    _, model = make(block_type="ffn", routing_group_size=8, spectral_mode="off")
    perturb_adapters(model)
    model.train()
    ids, mask, labels = tiny_batch()
    inputs = {}
    def keep(mod, args):
        inputs[mod] = args[0].detach().numpy()

    handles = [m.register_forward_pre_hook(keep) for m in model.adapter_layers.values()]
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    for h in handles:
        h.remove()
    valid = mask.numpy().astype(bool)
    values = []
    for layer, u in inputs.items():
        logit = (u @ layer.lora_router.detach().numpy().T).reshape(4, 7, 4, 3)
        pi = np.exp(logit - logit.max(-1, keepdims=True))
        pi /= pi.sum(-1, keepdims=True)
        means = pi[valid].reshape(-1, 3).mean(0)  # over batch, non-padding tokens and groups
        values.append(means.var(ddof=1) / (means.mean() ** 2 + 1e-10))
    assert set(out.aux_losses) == {"balance"}
    assert abs(float(out.aux_losses["balance"]) - np.mean(values)) < 1e-5


def np_released_term(b: np.ndarray) -> float:
    r = b.shape[1]
    sigma = np.linalg.svd(b, compute_uv=False)
    w = np.exp(-sigma / (sigma.mean() + 1e-8))
    c = np.linalg.norm(b) / np.sqrt(r) + 1e-8
    total = 0.0
    for i in range(r):
        for j in range(r):
            g = sum(b[k, i] * b[k, j] for k in range(b.shape[0]))
            total += (w[i] * w[j] * (g - (c**2 if i == j else 0.0))) ** 2
    return total


def test_spectral_released_matches_hand_computation_and_subsamples_by_step():
    rng = np.random.default_rng(0)
    mats = [rng.normal(size=(6, 3)) * s for s in (0.5, 1.0, 2.0, 0.1)]
    terms = [np_released_term(m) for m in mats]
    got = spectral_released([torch.tensor(m, requires_grad=True) for m in mats], step=0, max_matrices=64)
    # the singular values are taken in fp32 (as the released code), hence the 1e-6 relative tolerance
    assert abs(float(got.detach()) - np.mean(terms)) < 1e-6 * np.mean(terms)
    sub = float(spectral_released([torch.tensor(m) for m in mats], step=7, max_matrices=2))
    pairs = [np.mean([terms[i], terms[j]]) for i in range(4) for j in range(i + 1, 4)]
    assert min(abs(sub - p) for p in pairs) < 1e-6 * sub
    assert sub == float(spectral_released([torch.tensor(m) for m in mats], step=7, max_matrices=2))
    assert float(spectral_released([torch.zeros(6, 3)])) < 1e-20  # all-zero B (at init): finite and ~0


def test_spectral_paper_matches_hand_computation():
    rng = np.random.default_rng(1)
    experts = [rng.normal(size=(3, 8, 2)), rng.normal(size=(2, 8, 2))]  # two adapters: E = 3 and E = 2
    expected = []
    for bs in experts:
        total = 0.0
        for i in range(len(bs)):
            u, s, _ = np.linalg.svd(bs[i], full_matrices=False)
            w = np.exp(-s / s.mean())
            for j in range(len(bs)):
                if i != j:
                    for k in range(len(s)):
                        total += w[k] * np.sum((u[:, k] @ bs[j]) ** 2)
        expected.append(total)
    got = spectral_paper([torch.tensor(bs, requires_grad=True) for bs in experts])
    assert abs(float(got.detach()) - np.mean(expected)) < 1e-6 * np.mean(expected)
    got.backward()  # gradient flows to B (the SVD is treated as a constant)


@pytest.mark.parametrize("mode", ["released", "paper"])
def test_spectral_term_is_added_only_at_trigger_steps(mode):
    _, model = make(spectral_mode=mode, spectral_every=3, spectral_weight=2.0, balance_weight=0.0)
    perturb_adapters(model)
    model.train()
    ids, mask, labels = tiny_batch()
    assert [s for s in range(9) if spectral_due(s, 3)] == [2, 5, 8]
    values = {}
    for step in (0, 2):
        model.set_global_step(step)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        values[step] = (out.loss.detach(), out.aux_losses["spectral"])
    assert float(values[0][1]) == 0.0 and float(values[2][1]) > 0
    torch.testing.assert_close(values[2][0] - values[0][0], 2.0 * values[2][1], atol=1e-5, rtol=1e-5)
    assert mtpeft.MtLoRAConfig(spectral_mode=mode).spectral_period == (500 if mode == "released" else 1)


def test_component_mode_is_hydralora_with_mtlora_flags_and_bert_blocks_work():
    _, model = make(block_type="component", target_modules=["q_proj", "v_proj"], routing_group_size=None)
    assert all(isinstance(m, HydraLoRALinear) for m in model.adapter_layers.values())
    assert len(model.adapter_layers) == 4
    base, bert = make("bert", block_type="both")
    names = sorted(bert.adapter_layers)
    assert names[0].endswith("layer.0.attention.output.dense") and names[1].endswith("layer.0.output.dense")
    perturb_adapters(bert)
    bert.train()
    ids, mask, labels = tiny_batch()
    out = bert(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert all(p.grad is not None for _, p in bert.trainable_parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    _, model = make(spectral_mode="off")
    perturb_adapters(model)
    model.train()
    ids, mask, labels = tiny_batch()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.trainable_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for n, p in model.trainable_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5)


def test_errors_name_fields_and_architectures_without_blocks():
    allowed = r"\['ffn', 'attn', 'both', 'component'\]"
    with pytest.raises(mtpeft.ConfigError, match=r"MtLoRAConfig\.block_type must be one of " + allowed):
        mtpeft.MtLoRAConfig(block_type="mlp")
    with pytest.raises(mtpeft.ConfigError, match=r"spectral_mode must be one of \['released', 'paper'"):
        mtpeft.MtLoRAConfig(spectral_mode="on")

    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))

    with pytest.raises(mtpeft.ConfigError, match="no transformer layers.*`mlp` / `self_attn`.*component"):
        mtpeft.get_mt_model(NoBlocks(), {"method": "mtlora"})
    with pytest.raises(mtpeft.ConfigError, match="routing_group_size=12 must divide the output dimension 32"):
        make(routing_group_size=12)


def test_parameter_counts_at_paper_settings_on_meta_llama2_7b():
    import transformers as tf

    def meta_llama():
        with torch.device("meta"):
            return tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=4096, intermediate_size=11008,
                                                      num_hidden_layers=32, num_attention_heads=32,
                                                      vocab_size=32000))

    paper = {"method": "mtlora", "r": 16, "alpha": 64, "num_experts": 16, "block_type": "ffn"}
    model = mtpeft.get_mt_model(meta_llama(), {**paper, "routing_group_size": 2048})
    assert model.num_trainable_parameters() == 39_845_888
    assert next(iter(model.adapter_layers.values())).lora_B.device.type == "meta"
    scalar = mtpeft.get_mt_model(meta_llama(), {**paper, "routing_group_size": 4096})
    assert scalar.num_trainable_parameters() == 37_748_736
    baseline = {**paper, "block_type": "component", "target_modules": ["q_proj", "v_proj"],
                "routing_group_size": None}
    assert mtpeft.get_mt_model(meta_llama(), baseline).num_trainable_parameters() == 75_497_472


def test_layers_to_transform_limits_the_block_adapters():
    _, model = make(layers_to_transform=[1], block_type="both")
    assert sorted(model.adapter_layers) == ["model.layers.1.mlp", "model.layers.1.self_attn"]
    assert "block_type=both" in model.describe()
    with pytest.raises(mtpeft.ConfigError, match=r"layers_to_transform \[7\] selects no layer"):
        make(layers_to_transform=[7])


def test_other_decoders_with_an_mlp_child_work_and_export_explains_a_missing_output_linear():
    """GPT-2 layers have an `mlp` child (Conv1D projections, so no nn.Linear to fit an export onto)."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    base = tf.GPT2LMHeadModel(config).eval()
    model = mtpeft.get_mt_model(copy.deepcopy(base), {"method": "mtlora", "r": 4, "num_experts": 2})
    assert sorted(model.adapter_layers) == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    ids, mask, _ = tiny_batch()
    torch.testing.assert_close(logits(model, ids, mask), logits(base, ids, mask), atol=1e-5, rtol=0)
    with pytest.raises(mtpeft.MergeError, match="no single output linear layer"):
        model.export_peft("/nonexistent/never-written", rank=2,
                          calibration=[{"input_ids": ids, "attention_mask": mask}])
    with pytest.raises(mtpeft.ConfigError, match="no transformer layers with 'attn' sub-blocks"):
        mtpeft.get_mt_model(copy.deepcopy(base), {"method": "mtlora", "block_type": "attn"})


# --- issue 14: two routing groups at any width, the spectral term scheduled relative to the run -------------
@pytest.mark.parametrize("hidden", [576, 896, 3584])
def test_default_routes_in_two_groups_at_any_width(hidden):
    import transformers as tf

    with torch.device("meta"):
        base = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                                  num_hidden_layers=1, num_attention_heads=8,
                                                  num_key_value_heads=8, vocab_size=64))
    model = mtpeft.get_mt_model(base, {"method": "mtlora"})
    (block,) = model.adapter_layers.values()
    assert block.num_groups == 2 and block.lora_router.shape == (2 * 16, hidden)
    assert f"routing groups 2 x {hidden // 2} channels" in model.describe()


def test_auto_groups_on_a_width_they_do_not_divide_match_a_per_channel_reference():
    from mtpeft.core.routing import routed_up, routing_groups

    assert routing_groups(33, "auto", num_groups=2) == 2
    torch.manual_seed(0)
    z, pi, b = torch.randn(5, 4), torch.softmax(torch.randn(5, 2, 3), -1), torch.randn(3, 33, 4)
    channel_group = torch.tensor([0] * 17 + [1] * 16)  # groups of ceil(33 / 2) = 17, the last shorter
    expected = torch.einsum("ned,edr,nr->nd", pi[:, channel_group, :].transpose(1, 2), b, z)
    torch.testing.assert_close(routed_up(z, pi, b), expected, atol=1e-5, rtol=1e-5)
    _, model = make(routing_groups=3)  # 32 channels in 3 groups: 11, 11, 10
    ids, mask, labels = tiny_batch()
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert {m.num_groups for m in model.adapter_layers.values()} == {3}


def test_spectral_term_goes_on_the_first_micro_batch_of_a_due_step_only():
    _, model = make(spectral_weight=1.0, balance_weight=0.0)
    perturb_adapters(model)
    model.train()
    ids, mask, labels = tiny_batch()
    model.context.total_steps = 100
    assert [s for s in range(100) if model.adapter_config.spectral_fires(s, 100)] == [50]
    values = {}
    for step, micro in ((49, 0), (50, 0), (50, 1)):
        model.set_global_step(step)
        model.context.micro_step = micro
        values[(step, micro)] = float(model(input_ids=ids, attention_mask=mask, labels=labels).aux_losses["spectral"])
    assert values[(50, 0)] > 0 and values[(49, 0)] == 0 and values[(50, 1)] == 0
    assert model.context.counters == {"spectral_firings": 1}
    assert "at steps [50] of 100, fired 1x" in model.describe()
    # without a run length (a hand-written loop) the released period of 500 applies; presets resolve
    assert mtpeft.MtLoRAConfig().spectral_fires(499, None) and not mtpeft.MtLoRAConfig().spectral_fires(50, None)
    released = mtpeft.MtLoRAConfig.from_preset("released")
    assert released.spectral_fires(499, 100) and not released.spectral_fires(50, 100)


def test_spectral_term_fires_in_a_100_step_run_once_per_optimizer_step(tmp_path, tiny_model_dir):
    import json

    from conftest import toy_run_config

    from mtpeft.training.run_config import run_config_from_dict
    from mtpeft.training.trainer import train

    cfg = toy_run_config(tmp_path, tiny_model_dir, method="mtlora", steps=100, grad_accum=2, save_every=0,
                         log_every=1, batch_size=2)
    cfg["method"].update({"num_experts": 2, "balance_weight": 0.0})
    cfg["data"]["max_eval_per_task"] = 0
    train(run_config_from_dict(cfg), progress=False)
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["method_counters"] == {"spectral_firings": 1}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    spectral = {r["step"]: r["aux/spectral"] for r in records if "aux/spectral" in r}
    assert [s for s, v in spectral.items() if v > 0] == [51]  # global_step 50: the 51st update
    assert {r.get("counters", {}).get("spectral_firings", 0) for r in records if r["step"] > 51} == {1}


def test_paper_preset_and_explicit_keys_override_it():
    cfg = mtpeft.config_from_dict({"method": "mtlora", "preset": "paper", "dropout": 0.1})
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.num_experts, cfg.routing_groups) == (16, 64, 0.1, 16, 2)
    with pytest.raises(mtpeft.ConfigError, match=r"unknown preset 'best' for method 'mtlora'; allowed presets: "
                                                 r"\['paper', 'released'\]"):
        mtpeft.config_from_dict({"method": "mtlora", "preset": "best"})
    with pytest.raises(mtpeft.ConfigError, match="routing_group_size must be None, 'auto' or a positive integer"):
        mtpeft.MtLoRAConfig(routing_group_size="half")


def test_spectral_firings_before_an_interruption_stay_counted_after_resume(tmp_path, tiny_model_dir):
    import json

    from conftest import interrupt_at_draw, toy_run_config

    from mtpeft.training.run_config import run_config_from_dict
    from mtpeft.training.trainer import MultiTaskTrainer, TrainingError, train

    def config():
        data = toy_run_config(tmp_path, tiny_model_dir, method="mtlora", steps=8, save_every=6, log_every=1,
                              batch_size=2)
        data["method"].update({"num_experts": 2, "balance_weight": 0.0})  # fires once, at global step 4
        data["data"]["max_eval_per_task"] = 0
        return run_config_from_dict(data)

    trainer = MultiTaskTrainer(config(), progress=False)
    interrupt_at_draw(trainer, 7)  # Ctrl-C while step 7 draws its batch: the firing and checkpoint 6 are behind it
    with pytest.raises(TrainingError, match="interrupted at step 6"):
        trainer.train()
    train(config(), resume=True, progress=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method_counters"] == {"spectral_firings": 1}
