"""Fast paths equal the plain implementation: outputs and gradients; adapter layers compile without graph breaks."""

from __future__ import annotations

import pytest
import torch
from conftest import TASKS, perturb_adapters, tiny_batch, tiny_model

import mtpeft
from mtpeft.core.loss import linear_cross_entropy


def assert_chunked_loss_matches_model_loss(model, chunk: int, grad_atol: float, **inputs) -> None:
    """The label-only chunked loss (``chunk`` rows per block) gives the model's own loss and the same gradients
    on every trainable parameter."""
    plain = model(**inputs)
    plain.loss.backward()
    plain_grads = {n: p.grad.clone() for n, p in model.trainable_parameters()}
    model.zero_grad(set_to_none=True)
    model.loss_chunk_size = chunk
    fast = model(**inputs)
    assert fast.logits is None
    torch.testing.assert_close(fast.loss, plain.loss, atol=1e-6, rtol=1e-6)
    fast.loss.backward()
    for name, p in model.trainable_parameters():
        torch.testing.assert_close(p.grad, plain_grads[name], atol=grad_atol, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
@pytest.mark.parametrize("method", ["lora", "mtl_lora", "hydralora"])
def test_chunked_label_only_loss_equals_model_loss_and_gradients(arch, method):
    model = mtpeft.get_mt_model(tiny_model(arch), mtpeft.config_from_dict({"method": method, "tasks": TASKS, "r": 4}))
    perturb_adapters(model)
    model.eval()  # no dropout: both paths see the same function
    ids, mask, labels = tiny_batch(batch=4, seq=9)
    labels[:, :4] = -100  # prompt tokens carry no loss
    assert_chunked_loss_matches_model_loss(model, 3, 1e-6, input_ids=ids, attention_mask=mask, labels=labels,
                                           task_ids=torch.tensor([0, 1, 2, 0]))


@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("cpu_block_cap", [False, True])
def test_linear_cross_entropy_equals_plain_loss_and_gradients(chunk, bias, cpu_block_cap, monkeypatch):
    if cpu_block_cap:  # blocks of 200 // 40 = 5 rows whatever the chunk
        monkeypatch.setattr("mtpeft.core.loss._CPU_BLOCK_ELEMENTS", 200)
        monkeypatch.setattr("mtpeft.core.loss._CPU_MIN_BLOCK_ROWS", 1)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, requires_grad=True)
    b = torch.randn(40, generator=g, requires_grad=True) if bias else None
    targets = torch.randint(0, 40, (23,), generator=g)
    inputs = [hidden, weight] + ([b] if bias else [])
    plain = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight, b), targets,
                                              reduction="sum")
    fused = linear_cross_entropy(hidden, weight, b, targets, chunk)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-6)
    # a non-unit upstream gradient, as the mean over tokens gives
    g_plain = torch.autograd.grad(plain * 0.37, inputs)
    g_fused = torch.autograd.grad(fused * 0.37, inputs)
    for a, c in zip(g_fused, g_plain):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # no gradient work without grad mode, same loss
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, b, targets, chunk), plain.detach(),
                                   atol=1e-5, rtol=1e-6)


def test_chunked_loss_with_a_trainable_head_equals_model_loss_gradients():
    cfg = mtpeft.config_from_dict({"method": "lora", "tasks": TASKS, "r": 4, "modules_to_save": ["lm_head"]})
    model = mtpeft.get_mt_model(tiny_model(), cfg)
    perturb_adapters(model)
    ids, mask, labels = tiny_batch(batch=4, seq=9)
    labels[:, :3] = -100
    assert model.base_model.get_output_embeddings().weight.requires_grad
    assert_chunked_loss_matches_model_loss(model, 4, 1e-5, input_ids=ids, attention_mask=mask, labels=labels)


def test_fused_lora_forward_equals_plain_formula():
    model = mtpeft.get_mt_model(tiny_model(), mtpeft.LoRAConfig(r=4, alpha=8, target_modules=["q_proj"]))
    perturb_adapters(model)
    layer = next(iter(model.adapter_layers.values()))
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    fused = layer(x)
    plain = layer.base_layer(x) + layer.adapter_output(x)
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6)
    g_fused = torch.autograd.grad(fused.sum(), [x, layer.lora_A, layer.lora_B])
    g_plain = torch.autograd.grad(plain.sum(), [x, layer.lora_A, layer.lora_B])
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "align_lora", "thanora", "mtl_lora", "hydralora", "moe_lora", "mtlora"])
def test_adapter_forward_traces_without_graph_breaks(method):
    import torch._dynamo

    model = mtpeft.get_mt_model(tiny_model(), mtpeft.config_from_dict({"method": method, "tasks": TASKS, "r": 4}))
    model.train()
    ids, mask, labels = tiny_batch()
    model.context.task_ids = torch.tensor([0, 1, 2, 0])
    model.context.token_mask = mask
    model.context.collect = False
    layers = [m for m in model.adapter_layers.values()]
    layer = layers[0]
    x = torch.randn(4, 7, 32)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_chunked_loss_with_a_head_that_is_not_a_dense_linear_uses_its_forward():
    class Head(torch.nn.Module):  # stands in for a quantized head: not an nn.Linear with a float weight
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, h):
            return self.inner(h)

    base = tiny_model()
    base.lm_head = Head(base.lm_head)
    model = mtpeft.get_mt_model(base, mtpeft.config_from_dict({"method": "lora", "tasks": TASKS, "r": 4}))
    perturb_adapters(model)
    ids, mask, labels = tiny_batch(batch=4, seq=9)
    assert_chunked_loss_matches_model_loss(model, 4, 1e-5, input_ids=ids, attention_mask=mask, labels=labels)


FUSED_CASES = {
    "thanora": {"method": "thanora"},
    "thanora_task_masked": {"method": "thanora", "train_mode": "task_masked"},
    "hydralora": {"method": "hydralora", "num_experts": 3},
    "hydralora_dropout": {"method": "hydralora", "num_experts": 3, "dropout": 0.3},
    "hydralora_grouped": {"method": "hydralora", "num_experts": 3, "routing_group_size": 8},  # the plain path
    "mtlora_component": {"method": "mtlora", "block_type": "component", "num_experts": 3,
                         "routing_group_size": None},
    "moe_lora_task": {"method": "moe_lora", "num_experts": 2},
    "moe_lora_token": {"method": "moe_lora", "gating": "token", "num_experts": 2, "top_k": 1},
}


@pytest.mark.parametrize("case", list(FUSED_CASES))
@pytest.mark.parametrize("training", [True, False])
def test_fused_adapter_forward_equals_plain_formula(case, training):
    """The methods' one-addmm forwards equal W0 x + adapter_output(x), outputs and gradients (x and every
    adapter parameter)."""
    cfg = {"tasks": TASKS, "r": 4, "alpha": 8, "target_modules": ["q_proj", "k_proj", "down_proj"],
           **FUSED_CASES[case]}
    model = mtpeft.get_mt_model(tiny_model(), mtpeft.config_from_dict(cfg))
    perturb_adapters(model)
    model.train(training)
    model.context.task_ids = torch.tensor([0, 1, 2, 0])
    model.context.collect = training
    g = torch.Generator().manual_seed(0)
    for layer in model.adapter_layers.values():
        x = torch.randn(4, 5, layer.in_features, generator=g, requires_grad=True)
        params = [x] + [p for p in layer.parameters() if p.requires_grad]
        torch.manual_seed(1)  # the same dropout mask for both
        fused = layer(x)
        torch.manual_seed(1)
        plain = layer.base_layer(x) + layer.adapter_output(x)
        torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6)
        upstream = torch.randn(fused.shape, generator=g)
        g_fused = torch.autograd.grad(fused, params, upstream)
        g_plain = torch.autograd.grad(plain, params, upstream)
        for a, b in zip(g_fused, g_plain):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["thanora", "hydralora", "moe_lora"])
def test_adapter_forward_over_a_half_precision_base_is_the_plain_formula(method):
    model = mtpeft.get_mt_model(tiny_model().to(torch.bfloat16),
                                mtpeft.config_from_dict({"method": method, "tasks": TASKS, "r": 4}))
    perturb_adapters(model)
    model.context.task_ids = torch.tensor([0, 1, 2, 0])
    layer = next(iter(model.adapter_layers.values()))
    x = torch.randn(4, 5, layer.in_features).to(torch.bfloat16)
    assert torch.equal(layer(x), layer.base_layer(x) + layer.adapter_output(x).to(torch.bfloat16))
