"""Packed rows (data.packing): the collator, the base model's attention inside each example, and every method
giving the same loss (auxiliary losses included) and gradients on packed and padded batches of the same examples."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import interrupt_at_draw, perturb_adapters, tiny_model, toy_run_config
from test_data_collator import char_tokenizer

import mtpeft.model
from mtpeft import get_mt_model
from mtpeft.core.packed import segment_positions, unpack_segments
from mtpeft.data.collator import IGNORE_INDEX, MultiTaskCollator
from mtpeft.data.packing import first_fit, pack_encoded, real_token_count
from mtpeft.data.tasks import Example
from mtpeft.errors import ConfigError, RunConfigError
from mtpeft.training.packing import check_packed_attention
from mtpeft.training.run_config import run_config_from_dict

TASKS = ["a", "b", "c"]
VOCAB = 97
# (prompt length, target length, task) of the examples the packed and padded batches hold: three tasks, different
# lengths, so that rows mix tasks and the padded batch pads
EXAMPLES = [(3, 4, 0), (1, 2, 1), (2, 3, 2), (4, 5, 0), (2, 2, 1), (3, 3, 2)]
ROW = 12

DEFAULTS = [{"method": m} for m in
            ("lora", "align_lora", "thanora", "mtlora", "hydralora", "mtl_lora", "moe_lora", "ta_lora")]
VARIANTS = [
    {"method": "lora", "use_dora": True},
    {"method": "lora", "init_from_weights": "pissa"},
    {"method": "align_lora", "align_loss": "kl"},
    {"method": "align_lora", "align_pooling": "mean"},
    {"method": "thanora", "train_mode": "task_masked"},
    {"method": "mtlora", "block_type": "both"},
    {"method": "mtlora", "block_type": "component", "routing_group_size": None},
    {"method": "hydralora", "routing_group_size": "auto", "balance_weight": 0.01},
    {"method": "mtl_lora", "diagonal_lambda": True},
    {"method": "moe_lora", "gating": "token"},
    {"method": "ta_lora", "prompt_position": "input"},
    {"method": "ta_lora", "gate": "task"},
]
CASES = ([pytest.param("llama", c, id=f"llama-{c['method']}") for c in DEFAULTS]
         + [pytest.param("qwen2", c, id=f"qwen2-{c['method']}") for c in DEFAULTS]
         + [pytest.param("llama", c, id="llama-" + "-".join(f"{v}" for v in c.values())) for c in VARIANTS])


def encoded_examples(seed: int = 5) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
    """(input ids, labels) of EXAMPLES with random tokens, labels -100 on the prompt, and their task ids."""
    gen = torch.Generator().manual_seed(seed)
    encoded, tasks = [], []
    for prompt, target, task in EXAMPLES:
        ids = torch.randint(3, VOCAB, (prompt + target,), generator=gen).tolist()
        encoded.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
        tasks.append(task)
    return encoded, tasks


def padded_batch(encoded, tasks) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in encoded)
    batch = {"input_ids": torch.zeros(len(encoded), width, dtype=torch.long),
             "attention_mask": torch.zeros(len(encoded), width, dtype=torch.long),
             "labels": torch.full((len(encoded), width), IGNORE_INDEX), "task_ids": torch.tensor(tasks)}
    for row, (ids, labels) in enumerate(encoded):
        batch["input_ids"][row, :len(ids)] = torch.tensor(ids)
        batch["attention_mask"][row, :len(ids)] = 1
        batch["labels"][row, :len(labels)] = torch.tensor(labels)
    return batch


def both_batches() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    encoded, tasks = encoded_examples()
    packed = pack_encoded(encoded, tasks, ROW, pad_id=0)
    mixed = [len(set(t[s >= 0].tolist())) for t, s in zip(packed["task_ids"], packed["segment_ids"])]
    assert len(packed["input_ids"]) < len(encoded) and max(mixed) > 1  # the rows really pack and mix tasks
    return padded_batch(encoded, tasks), packed


def build(arch: str, method: dict, attn: str | None = None):
    base = tiny_model(arch, vocab=VOCAB).double()
    if attn is not None:
        base.set_attn_implementation(attn)
    model = get_mt_model(base, {"tasks": TASKS, **method})
    perturb_adapters(model, seed=1)  # B != 0, gates open: every parameter gets a gradient
    return model


def float64_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss computed in float64 (the models' own cross-entropy runs in float32): the token-mean
    cross-entropy over the batch's target tokens plus the weighted auxiliary losses, and the auxiliary values."""
    spec, weighted = model.method, {}
    if spec.aux_losses is not None:
        def capture(m):  # keep the auxiliary terms with their graph; the model only keeps detached copies
            weighted.update(spec.aux_losses(m))
            return weighted
        model.method = dataclasses.replace(spec, aux_losses=capture)
    try:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    finally:
        model.method = spec
    targets = batch["labels"][:, 1:]
    lm = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="sum") / (targets != IGNORE_INDEX).sum()
    assert lm.dtype == torch.float64
    total = lm + sum((value * weight for value, weight in weighted.values() if weight), torch.zeros((), dtype=lm.dtype))
    return total, {k: v.detach() for k, (v, _) in weighted.items()}


def gradients(model) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.trainable_parameters()}


@pytest.mark.parametrize(("arch", "method"), CASES)
def test_packed_and_padded_batches_give_the_same_loss_aux_losses_and_gradients(arch, method) -> None:
    torch.set_num_threads(1)
    model = build(arch, method)
    model.train()
    padded, packed = both_batches()
    results = []
    for batch in (padded, packed):
        model.zero_grad(set_to_none=True)
        loss, aux = float64_loss(model, batch)
        loss.backward()
        results.append((loss.detach(), aux, gradients(model)))
        with torch.no_grad():
            model.eval()  # the model's own (float32) loss and the trainer's chunked one, without the aux terms
            results[-1] += (model(**batch).loss, _chunked(model, batch))
            model.train()
    (loss0, aux0, grads0, own0, chunked0), (loss1, aux1, grads1, own1, chunked1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-12, atol=0)
    assert aux1.keys() == aux0.keys()
    for name in aux0:
        torch.testing.assert_close(aux1[name], aux0[name], rtol=1e-10, atol=1e-14, msg=name)
    for loss_packed, loss_padded in ((own1, own0), (chunked1, chunked0)):
        torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-6, atol=0)  # float32 sums in another order
    assert grads1.keys() == grads0.keys()
    nonzero = 0
    for name, g0 in grads0.items():
        g1 = grads1[name]
        assert (g0 is None) == (g1 is None), name
        if g0 is None:
            continue
        scale = float(g0.abs().max())
        nonzero += scale > 0
        torch.testing.assert_close(g1, g0, rtol=1e-10, atol=1e-10 * scale, msg=name)
    assert nonzero >= 0.9 * len(grads0)  # the comparison is not between zeros


def _chunked(model, batch):
    model.loss_chunk_size = 4
    try:
        return model(**batch).loss
    finally:
        model.loss_chunk_size = 0


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(("arch", "method"), [pytest.param(a, c, id=f"{a}-{c['method']}") for a in ("llama", "qwen2")
                                              for c in DEFAULTS + [VARIANTS[10]]])
def test_packed_attention_does_not_cross_examples(arch, method, attn) -> None:
    torch.set_num_threads(1)
    model = build(arch, method, attn).eval()
    _, packed = both_batches()
    changed = dict(packed)
    changed["input_ids"] = packed["input_ids"].clone()
    own = (packed["segment_ids"] == 0) & (torch.arange(len(packed["input_ids"]))[:, None] == 0)  # row 0's first
    changed["input_ids"][own] = (packed["input_ids"][own] + 7) % VOCAB
    with torch.no_grad():
        before = model(**packed).logits
        after = model(**changed).logits
    others = ~own & (packed["segment_ids"] >= 0)
    torch.testing.assert_close(after[others], before[others], rtol=0, atol=1e-12)
    assert (after[own] - before[own]).abs().max() > 1e-3  # the change itself is visible


def test_packed_row_logits_equal_each_example_run_alone() -> None:
    torch.set_num_threads(1)
    model = build("llama", {"method": "mtl_lora"}).eval()
    encoded, tasks = encoded_examples()
    packed = pack_encoded(encoded, tasks, ROW, pad_id=0)
    with torch.no_grad():
        logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits
        for row, segments in enumerate(first_fit([len(ids) for ids, _ in encoded], ROW)):
            for segment, i in enumerate(segments):
                alone = model(input_ids=torch.tensor([encoded[i][0]]), task_ids=[tasks[i]]).logits[0]
                torch.testing.assert_close(logits[row][packed["segment_ids"][row] == segment], alone,
                                           rtol=1e-10, atol=1e-12)


def test_collator_packs_rows_with_restarting_positions_masked_labels_and_token_task_ids() -> None:
    tok = char_tokenizer()
    examples = [Example(task=t, prompt=p, target=y) for t, p, y in
                [("a", "Q:1", " 2"), ("b", "Q:10+5", " 15"), ("c", "x", " y"), ("a", "long prompt", " z"),
                 ("b", "Q:7", " 7")]]
    col = MultiTaskCollator(tok, TASKS, max_length=20, packing=True)
    batch = col(examples)
    assert set(batch) == {"input_ids", "labels", "position_ids", "task_ids", "segment_ids"}
    assert all(v.dtype == torch.long and v.shape == batch["input_ids"].shape for v in batch.values())
    encoded = [col.encode(ex, i) for i, ex in enumerate(examples)]
    rows = first_fit([len(ids) for ids, _ in encoded], 20)
    assert len(batch["input_ids"]) == len(rows) < len(examples)
    assert sorted(i for row in rows for i in row) == list(range(len(examples)))  # every example exactly once
    for r, row in enumerate(rows):
        start = 0
        for segment, i in enumerate(row):
            ids, labels = encoded[i]
            where = slice(start, start + len(ids))
            assert batch["input_ids"][r, where].tolist() == ids
            assert batch["labels"][r, where].tolist() == [IGNORE_INDEX] + labels[1:]  # prompt masked, and the first
            assert batch["position_ids"][r, where].tolist() == list(range(len(ids)))  # token never a target
            assert batch["task_ids"][r, where].tolist() == [TASKS.index(examples[i].task)] * len(ids)
            assert batch["segment_ids"][r, where].tolist() == [segment] * len(ids)
            start += len(ids)
        pads = slice(start, None)
        assert (batch["labels"][r, pads] == IGNORE_INDEX).all() and (batch["segment_ids"][r, pads] == -1).all()
        assert batch["position_ids"][r, pads].tolist() == list(range(batch["input_ids"].shape[1] - start))
    # the same target tokens as the padded batch, and the same real-token count
    padded = col.padded(examples)
    assert set(padded) == {"input_ids", "attention_mask", "labels", "task_ids"} and padded["task_ids"].dim() == 1
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert float(real_token_count(batch)) == float(real_token_count(padded)) == sum(len(i) for i, _ in encoded)


def test_an_example_without_prompt_tokens_is_not_a_target_of_the_example_before_it() -> None:
    tok = char_tokenizer(bos=False)
    examples = [Example(task="a", prompt="Q:12", target=" 3"), Example(task="b", prompt="", target=" xy")]
    col = MultiTaskCollator(tok, TASKS, max_length=32, packing=True)
    batch, padded = col(examples), col.padded(examples)
    assert batch["input_ids"].shape[0] == 1 and batch["segment_ids"][0].tolist().count(1) == 4
    assert padded["labels"][1, 0] != IGNORE_INDEX  # the target starts the padded row: never predicted there
    start = batch["segment_ids"][0].tolist().index(1)
    assert batch["labels"][0, start] == IGNORE_INDEX  # nor across the boundary in the packed row
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_segment_positions_and_unpacking_give_the_padded_layout() -> None:
    segments = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 1, 1, 1, 1]])
    assert segment_positions(segments).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]]
    values = torch.arange(12.0).reshape(2, 6, 1).requires_grad_()
    tasks = torch.tensor([[2, 2, 2, 0, 0, 0], [1, 1, 2, 2, 2, 2]])
    out, mask, ids = unpack_segments(values, segments, tasks)
    assert out[..., 0].tolist() == [[0, 1, 2, 0], [3, 4, 0, 0], [6, 7, 0, 0], [8, 9, 10, 11]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]] and ids.tolist() == [2, 0, 1, 2]
    out.sum().backward()
    assert values.grad[..., 0].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]


def test_first_fit_fills_the_first_row_with_room_longest_first() -> None:
    assert first_fit([5, 4, 3, 3, 1], 8) == [[0, 2], [1, 3, 4]]
    assert first_fit([2, 2], 8) == [[0, 1]]
    with pytest.raises(ValueError, match="more than the row length 4"):
        first_fit([3, 5], 4)


def test_probe_passes_where_attention_stays_inside_examples_and_refuses_where_it_crosses(monkeypatch) -> None:
    for arch in ("llama", "qwen2"):
        check_packed_attention(build(arch, {"method": "lora"}))

    def leaky(segment_ids, attention_mask, kwargs):  # a model that ignores the packed layout
        kwargs["position_ids"] = segment_positions(segment_ids)
        kwargs["use_cache"] = True  # transformers skips the packed-sequence check with a cache

    monkeypatch.setattr(mtpeft.model, "packed_inputs", leaky)
    with pytest.raises(ConfigError, match=r"data\.packing: LlamaForCausalLM's attention crosses the examples"):
        check_packed_attention(build("llama", {"method": "lora"}))


def test_forward_refuses_packed_rows_with_an_attention_mask_or_a_cache() -> None:
    model = build("llama", {"method": "lora"})
    _, packed = both_batches()
    with pytest.raises(ValueError, match="need attention_mask=None"):
        model(**packed, attention_mask=torch.ones_like(packed["input_ids"]))
    with pytest.raises(ValueError, match="cannot use the KV cache"):
        model(**packed, use_cache=True)
    with pytest.raises(ValueError, match="do not match segment_ids"):
        model(**{**packed, "task_ids": packed["task_ids"][:, :-1]})


def test_run_config_key_data_packing_is_a_validated_bool_off_by_default() -> None:
    assert run_config_from_dict({"tasks": ["demo"]}).data.packing is False
    assert run_config_from_dict({"tasks": ["demo"], "data": {"packing": True}}).data.packing is True
    with pytest.raises(RunConfigError, match=r"data\.packing must be of type bool"):
        run_config_from_dict({"tasks": ["demo"], "data": {"packing": "yes"}})


@pytest.mark.parametrize("method", ["lora", "thanora"])  # ThanoRA: its calibration batches stay padded
def test_training_with_packing_logs_the_losses_of_the_padded_run(tmp_path, tiny_model_dir, method,
                                                                  monkeypatch) -> None:
    import mtpeft.data.collator as collator
    from mtpeft.training.trainer import train

    torch.set_num_threads(1)
    histories, packed_rows = {}, []

    def pack(encoded, *args):
        out = pack_encoded(encoded, *args)
        packed_rows.append((len(out["input_ids"]), len(encoded)))
        return out

    monkeypatch.setattr(collator, "pack_encoded", pack)
    for packing in (False, True):
        data = toy_run_config(tmp_path / str(packing), tiny_model_dir, method=method, steps=2, save_every=0)
        data["method"]["dropout"] = 0.0  # dropout masks would differ between the layouts
        data["data"]["packing"] = packing
        result = train(run_config_from_dict(data), progress=False)
        lines = (result.output_dir / "metrics.jsonl").read_text().splitlines()
        histories[packing] = [json.loads(line) for line in lines if '"loss"' in line]
    padded, packed = histories[False], histories[True]
    assert len(packed_rows) == 2 and all(rows < examples for rows, examples in packed_rows)  # the training batches
    assert [r["step"] for r in packed] == [r["step"] for r in padded] == [1, 2]
    for a, b in zip(padded, packed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        losses = {k: v for k, v in a.items() if k.startswith("task_loss/")}
        assert losses and {k: v for k, v in b.items() if k.startswith("task_loss/")} == pytest.approx(losses,
                                                                                                      rel=1e-5)


def test_resume_of_a_packed_run_equals_the_uninterrupted_run_exactly(tmp_path, tiny_model_dir) -> None:
    from safetensors.torch import load_file

    from mtpeft.training.trainer import MultiTaskTrainer, TrainingError, train

    torch.set_num_threads(1)

    def config(folder):
        data = toy_run_config(tmp_path / folder, tiny_model_dir, method="align_lora", steps=4, save_every=2)
        data["data"]["packing"] = True
        return run_config_from_dict(data)

    full = train(config("full"), progress=False)
    trainer = MultiTaskTrainer(config("part"), progress=False)
    interrupt_at_draw(trainer, 3)  # Ctrl-C while step 3 draws its batch, after checkpoint 2
    with pytest.raises(TrainingError, match="interrupted at step 2"):
        trainer.train()
    resumed = train(config("part"), resume=True, progress=False)
    a, b = (load_file(str(r.output_dir / "adapter" / "adapter_model.safetensors")) for r in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
