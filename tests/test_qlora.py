"""QLoRA: adapters over a bitsandbytes 4-bit (and 8-bit) base, gradient checkpointing, merge into dequantized
weights. bitsandbytes runs 4-bit layers on the CPU too, so these run in CI; the GPU check skips without CUDA.

On CPUs with AVX-512-BF16, bitsandbytes repacks a 4-bit weight in place for a bf16 inference kernel at the first
eval-mode forward without grad; mtpeft keeps the standard layout (that kernel has no autograd and merging reads the
standard bytes), so the 4-bit tests run an eval forward before they merge or train, at tiny widths (below the 4-bit
blocksize 64) and at real ones (multiples of 64, which that kernel's layout needs)."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import toy_run_config

import mtpeft
from mtpeft.base_models import load_base_model, quantization_config
from mtpeft.core.quant import dense_weight, keep_standard_4bit_layout

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'mtpeft[qlora]')")

TARGETS = ["q_proj", "v_proj", "down_proj"]
# (hidden, intermediate): below the 4-bit blocksize, the width used so far, and real multiples of 64
WIDTHS = {"tiny": (32, 48), "small": (64, 128), "real": (128, 256)}
CPU_REPACKING = bool(getattr(bnb.functional, "has_avx512bf16", lambda: False)())
_convert_for_cpu = getattr(bnb.functional, "_convert_weight_packed_for_cpu", None)


def _save_llama(folder, hidden: int, intermediate: int, **extra) -> None:
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, **{"vocab_size": 128,
                                                                          "max_position_embeddings": 64, **extra})
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(folder)


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    """Random Llamas for 4-bit loading, one folder per entry of WIDTHS."""
    folders = {}
    for key, (hidden, intermediate) in WIDTHS.items():
        folders[key] = tmp_path_factory.mktemp(f"llama-for-4bit-{key}")
        _save_llama(folders[key], hidden, intermediate)
    return folders


@pytest.fixture(scope="module")
def small_llama_dir(llama_dirs):
    return llama_dirs["small"]


@pytest.fixture(scope="module")
def real_width_model_dir(tmp_path_factory, smollm2_dir):
    """As conftest's tiny model (real SmolLM2 tokenizer, tied embeddings) at widths 128/256."""
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(smollm2_dir)
    folder = tmp_path_factory.mktemp("real-width-llama")
    _save_llama(folder, 128, 256, vocab_size=len(tokenizer), max_position_embeddings=128, tie_word_embeddings=True,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    tokenizer.save_pretrained(folder)
    return folder


def _linear4bit(model) -> list:
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _repacked(model) -> list:
    """The 4-bit layers whose weight is in bitsandbytes' CPU inference layout."""
    return [m for m in _linear4bit(model) if getattr(m.weight.quant_state, "packing_format_for_cpu", False)]


def _eval_forward(model, x, **kwargs) -> torch.Tensor:
    """What ``eval.before_training`` / ``eval_every`` do: eval mode, no grad."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=x, **kwargs).logits


def _assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal within fp32 arithmetic: the tolerance scales with the largest logit (summation order differs)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, atol=rel * scale, rtol=10 * rel)


def _randomize_b(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_lambda" in name:
                p.normal_(0, 0.1)


@pytest.mark.parametrize("width", list(WIDTHS))
@pytest.mark.parametrize("method", ["lora", "mtl_lora"])
def test_4bit_base_trains_only_adapters_and_merges_into_dequantized_weights(llama_dirs, tmp_path, method, width):
    import transformers as tf

    base = load_base_model(str(llama_dirs[width]), quantization="4bit")
    assert isinstance(base.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    model = mtpeft.get_mt_model(base, {"method": method, "tasks": ["a", "b"], "r": 4, "target_modules": TARGETS})
    x = torch.randint(0, 128, (2, 8))
    ids = torch.tensor([0, 1])
    _eval_forward(model, x, task_ids=ids)  # an evaluation before training (eval.before_training)
    assert not _repacked(model)
    model.train()
    model(input_ids=x, labels=x, task_ids=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, _ in model.trainable_parameters()}
    assert with_grad and with_grad <= trainable
    assert not any("base_layer" in n or "embed" in n or "norm" in n for n in trainable)

    _randomize_b(model)
    model.eval()
    task = "a" if method == "mtl_lora" else None
    with torch.no_grad():
        unmerged = model(input_ids=x, task_ids=[task or "a"] * 2).logits  # an eval forward before merging
        merged = model.merge_and_unload(task)
        out = merged(input_ids=x).logits
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in merged.modules())
    assert not hasattr(merged.config, "quantization_config")
    _assert_logits_close(out, unmerged)
    merged.save_pretrained(tmp_path / "merged")  # a plain full-precision model
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, out, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("width", list(WIDTHS))
@pytest.mark.parametrize("method", ["lora", "mtl_lora"])
def test_every_adapter_parameter_gets_a_gradient_after_an_eval_forward(llama_dirs, method, width):
    base = load_base_model(str(llama_dirs[width]), quantization="4bit")
    model = mtpeft.get_mt_model(base, {"method": method, "tasks": ["a", "b"], "r": 4, "target_modules": TARGETS})
    x = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([0, 1])
    _eval_forward(model, x, task_ids=ids)
    model.train()
    model(input_ids=x, labels=x, task_ids=ids).loss.backward()
    missing = [n for n, p in model.trainable_parameters() if p.grad is None]
    assert not missing, f"{len(missing)} adapter parameters without a gradient: {missing[:4]}"
    # zero-initialised B gets a non-zero gradient in every adapted layer (it stayed zero in q/v when bitsandbytes'
    # inference kernel, which has no autograd, ran the base layer)
    for name, p in model.trainable_parameters():
        if name.endswith("lora_B"):
            assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.skipif(_convert_for_cpu is None, reason="this bitsandbytes has no CPU inference layout for 4-bit weights")
def test_dense_weight_reads_the_cpu_inference_layout_and_injection_restores_the_standard_one(storage, double_quant):
    # the repacking itself is plain torch, so the layout conversion is checked on every CPU
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(256, 128, compute_dtype=torch.float32, compress_statistics=double_quant,
                              quant_type="nf4", quant_storage=storage).to("cpu")
    standard_bytes = layer.weight.data.clone()
    reference = dense_weight(layer).clone()
    assert reference.shape == (128, 256) and reference.dtype == torch.float32
    layer.weight.data, layer.weight.quant_state = _convert_for_cpu(layer.weight.data, layer.weight.quant_state)
    assert layer.weight.quant_state.packing_format_for_cpu
    packed = dense_weight(layer)
    assert packed.dtype == reference.dtype
    # the layout keeps the block scales in bf16: equal up to that rounding
    torch.testing.assert_close(packed, reference, atol=2**-8 * reference.abs().max().item(), rtol=0)

    keep_standard_4bit_layout(layer)
    assert not _repacked(layer) and not layer.support_avx512bf16_for_cpu
    assert torch.equal(layer.weight.data.view(torch.uint8), standard_bytes.view(torch.uint8))
    torch.testing.assert_close(dense_weight(layer), packed, atol=0, rtol=0)
    layer.eval()
    x = torch.randn(3, 256, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert x.grad is not None  # the standard layout runs through autograd
    torch.testing.assert_close(out, x @ packed.T + layer.bias, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not CPU_REPACKING, reason="this CPU lacks avx512_bf16: bitsandbytes never repacks 4-bit weights "
                                              "for its CPU inference kernel here")
@pytest.mark.parametrize("method", ["lora", "mtl_lora"])
def test_a_model_repacked_by_bitsandbytes_avx512_bf16_path_trains_and_merges(llama_dirs, method):
    import transformers as tf

    # loaded by transformers itself, so bitsandbytes' AVX-512-BF16 path is on; an eval forward takes it
    base = tf.AutoModelForCausalLM.from_pretrained(llama_dirs["real"], dtype=torch.float32, device_map={"": "cpu"},
                                                   quantization_config=quantization_config("4bit", torch.float32))
    x = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    _eval_forward(base, x)
    assert _repacked(base) and len(_repacked(base)) == len(_linear4bit(base))
    packed_logits = _eval_forward(base, x)

    model = mtpeft.get_mt_model(base, {"method": method, "tasks": ["a", "b"], "r": 4, "target_modules": TARGETS})
    assert not _repacked(model)
    ids = torch.tensor([0, 1])
    # the same weights as the packed kernel used (its bf16 activations aside)
    _assert_logits_close(_eval_forward(model, x, task_ids=ids), packed_logits, rel=2e-2)
    assert not _repacked(model)
    model.train()
    model(input_ids=x, labels=x, task_ids=ids).loss.backward()
    assert all(p.grad is not None for _, p in model.trainable_parameters())
    _randomize_b(model)
    task = "a" if method == "mtl_lora" else None
    unmerged = _eval_forward(model, x, task_ids=["a", "a"])
    with torch.no_grad():
        out = model.merge_and_unload(task)(input_ids=x).logits
    _assert_logits_close(out, unmerged)


def test_gradient_checkpointing_over_a_4bit_base_gives_the_same_gradients(small_llama_dir):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        model = mtpeft.get_mt_model(load_base_model(str(small_llama_dir), quantization="4bit"),
                                    {"method": "lora", "tasks": ["a"], "r": 4, "target_modules": TARGETS})
        _randomize_b(model)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        x = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
        model(input_ids=x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


def test_8bit_base_merges_within_int8_activation_rounding(small_llama_dir):
    model = mtpeft.get_mt_model(load_base_model(str(small_llama_dir), quantization="8bit"),
                                {"method": "lora", "tasks": ["a"], "r": 4, "target_modules": TARGETS})
    _randomize_b(model)
    model.eval()
    x = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        unmerged = model(input_ids=x).logits
        out = model.merge_and_unload()(input_ids=x).logits
    # LLM.int8 also rounds the activations; the merged model computes with the exact dequantized weights
    assert (out - unmerged).abs().max() <= 0.05 * unmerged.abs().max()


@pytest.mark.parametrize("width", ["tiny", "real"])
def test_a_run_config_trains_a_4bit_base_end_to_end(tmp_path, request, width):
    from safetensors.torch import load_file

    from mtpeft.training.run_config import load_run_config
    from mtpeft.training.trainer import train

    model_dir = request.getfixturevalue("tiny_model_dir" if width == "tiny" else "real_width_model_dir")
    cfg = toy_run_config(tmp_path, model_dir, steps=2, save_every=0)
    cfg["model"].update({"quantization": "4bit", "gradient_checkpointing": True})
    cfg["eval"]["before_training"] = True  # an eval-mode forward before the first training step
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = train(load_run_config(path), progress=False)
    assert result.steps == 2 and result.final_loss is not None and torch.isfinite(torch.tensor(result.final_loss))
    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    b_factors = {name: t for name, t in adapter.items() if "lora_B" in name}
    assert b_factors and all(t.abs().sum() > 0 for t in b_factors.values()), "a zero-initialised B did not train"


def test_unknown_quantization_is_a_config_error(tmp_path, tiny_model_dir):
    from mtpeft.training.run_config import RunConfigError, run_config_from_dict

    cfg = toy_run_config(tmp_path, tiny_model_dir)
    cfg["model"]["quantization"] = "3bit"
    with pytest.raises(RunConfigError, match="model.quantization"):
        run_config_from_dict(cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA on a GPU needs CUDA; none here")
def test_4bit_lora_on_gpu_matches_merged(small_llama_dir):
    base = load_base_model(str(small_llama_dir), quantization="4bit", dtype="bfloat16")
    model = mtpeft.get_mt_model(base, {"method": "lora", "tasks": ["a"], "r": 4, "target_modules": TARGETS})
    _randomize_b(model)
    model.eval()
    x = torch.randint(0, 128, (2, 8), device="cuda")
    with torch.no_grad():
        unmerged = model(input_ids=x).logits.float()
        out = model.merge_and_unload()(input_ids=x).logits.float()
    torch.testing.assert_close(out, unmerged, atol=3e-2, rtol=3e-2)  # bf16 compute
