"""Metrics on hand-computed cases."""

from __future__ import annotations

import math

import pytest

from mtpeft.data.metrics import (
    METRICS,
    bbh_extract_answer,
    bbh_match,
    compute_metric,
    exact_match,
    extract_number,
    f1,
    matthews_corrcoef,
    normalize_answer,
    numeric_match,
    pearson,
    rouge_l,
    score_example,
    token_f1,
)


def test_normalize_answer() -> None:
    assert normalize_answer("  The  Answer.. \n") == "the answer"
    assert normalize_answer("3.5") == "3.5"
    assert normalize_answer(42) == "42"


def test_exact_match() -> None:
    assert exact_match(["True", " false.", "Yes"], ["true", "False", "no"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="differ in length: 1 vs 2"):
        exact_match(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="zero examples"):
        exact_match([], [])


def test_mcc_hand_computed() -> None:
    # confusion matrix: TP=3, TN=2, FP=1, FN=2 -> (6 - 2) / sqrt(4 * 5 * 3 * 4) = 4 / sqrt(240)
    refs = ["y"] * 5 + ["n"] * 3
    preds = ["y", "y", "y", "n", "n"] + ["n", "n", "y"]
    assert matthews_corrcoef(preds, refs) == pytest.approx(4 / math.sqrt(240))
    assert matthews_corrcoef(refs, refs) == pytest.approx(1.0)
    assert matthews_corrcoef(["y" if r == "n" else "n" for r in refs], refs) == pytest.approx(-1.0)
    assert matthews_corrcoef(["y"] * 8, refs) == 0.0  # constant prediction


def test_mcc_multiclass_matches_formula() -> None:
    refs = ["a", "a", "b", "b", "c", "c"]
    preds = ["a", "b", "b", "b", "c", "a"]
    # c=4, s=6, p=(2,3,1), t=(2,2,2): (24 - 12) / sqrt((36 - 14) * (36 - 12))
    assert matthews_corrcoef(preds, refs) == pytest.approx(12 / math.sqrt(22 * 24))


def test_f1_token_and_binary() -> None:
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(2 * (2 / 2) * (2 / 3) / (1 + 2 / 3))
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    # binary: TP=2, FP=1, FN=1 -> P=2/3, R=2/3, F1=2/3
    preds = ["yes", "yes", "yes", "no", "no"]
    refs = ["yes", "yes", "no", "yes", "no"]
    assert f1(preds, refs, positive_label="yes") == pytest.approx(2 / 3)
    assert compute_metric("f1", preds, refs, positive_label="no") == pytest.approx(0.5)


def test_rouge_l_hand_computed() -> None:
    # LCS("the cat sat on the mat", "the cat was on the mat") = 5 of 6 tokens each side
    assert rouge_l(["the cat sat on the mat"], ["the cat was on the mat"]) == pytest.approx(5 / 6)
    assert rouge_l(["a b", "x"], ["a b", "y"]) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Let's think. So the answer is (B).", "(B)"),
        ("The answer is: True.\nQ: next question", "True"),
        (" False\nQ: more", "False"),
        ("\n\n  valid  \nsomething", "valid"),
        ("blah the answer is 12. Then the answer is 13.", "13"),
    ],
)
def test_bbh_extract_answer(text: str, answer: str) -> None:
    assert bbh_extract_answer(text) == answer


def test_bbh_match_option_letters() -> None:
    assert bbh_match(" (A)", "(A)")
    assert bbh_match("A", "(A)")
    assert bbh_match("a)", "(A)")
    assert bbh_match("(A) The red ball", "(A)")
    assert not bbh_match("B", "(A)")
    assert not bbh_match("(A)", "(B)")
    assert bbh_match("so the answer is no.", "No")
    assert not bbh_match("A", "Alpha")
    assert compute_metric("bbh", [" (C)", "C", " D"], ["(C)", "(C)", "(C)"]) == pytest.approx(2 / 3)


def test_numeric_extraction_and_match() -> None:
    assert extract_number(" 576") == 576.0
    assert extract_number("1,234.5 apples") == 1234.5
    assert extract_number("He has 3 bags. The answer is 18.") == 18.0
    assert extract_number("no number here") is None
    assert extract_number(-2) == -2.0
    assert numeric_match(" 576\nQ: next 12", "576.0")
    assert numeric_match("0.3333", "0.3333333333")
    assert not numeric_match("57", "576")
    assert compute_metric("numeric", ["18", "x", "-4"], ["18.0", "2", "-4"]) == pytest.approx(2 / 3)


def test_pearson() -> None:
    assert pearson(["1", "2", "3"], ["2.0", "4.0", "6.0"]) == pytest.approx(1.0)
    assert pearson(["3", "2", "1"], ["1", "2", "3"]) == pytest.approx(-1.0)
    assert pearson(["?", "?", "?"], ["1", "2", "3"]) == 0.0


def test_registry_and_errors() -> None:
    assert {"exact_match", "accuracy", "rouge_l", "f1", "mcc", "bbh"} <= set(METRICS)
    with pytest.raises(ValueError, match=r"unknown metric 'blue'; available metrics: \["):
        compute_metric("blue", ["a"], ["a"])
    assert score_example("bbh", "A", "(A)") == 1.0
    assert score_example("mcc", "yes", "Yes") == 1.0
    assert score_example("f1", "a cat", "the cat") == 1.0
