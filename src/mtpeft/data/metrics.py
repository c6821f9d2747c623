"""Answer normalization, answer extraction and task metrics.

Every corpus metric takes ``(predictions, references)`` (equal-length sequences of strings) and
returns a float; scores are fractions (``0.75`` means 75%), callers turn them into percentages.
``accuracy``, ``exact_match``, ``bbh``, ``numeric``, ``f1`` and ``rouge_l`` lie in [0, 1];
``mcc`` and ``pearson`` are correlations in [-1, 1].
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "METRICS",
    "EXAMPLE_SCORERS",
    "normalize_answer",
    "exact_match",
    "accuracy",
    "rouge_l",
    "f1",
    "token_f1",
    "binary_f1",
    "matthews_corrcoef",
    "pearson",
    "bbh_extract_answer",
    "bbh_match",
    "bbh_accuracy",
    "extract_number",
    "numeric_match",
    "numeric_accuracy",
    "compute_metric",
    "score_example",
]


# ------------------------------------------------------------------------------------ normalization


def normalize_answer(text: Any) -> str:
    """Normalize an answer for exact comparison.

    Strips surrounding whitespace, lower-cases, collapses runs of whitespace to one space and removes
    trailing periods (``" The Answer.  "`` -> ``"the answer"``). Non-strings are converted with ``str``.
    """
    s = " ".join(str(text).lower().split())
    while s.endswith("."):
        s = s[:-1].rstrip()
    return s


def _check_lengths(predictions: Sequence[Any], references: Sequence[Any]) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references differ in length: {len(predictions)} vs {len(references)}"
        )
    if not predictions:
        raise ValueError("cannot compute a metric over zero examples")


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after :func:`normalize_answer`."""
    _check_lengths(predictions, references)
    return sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)) / len(
        predictions
    )


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predicted labels/options equal to the gold one (after :func:`normalize_answer`)."""
    return exact_match(predictions, references)


# ----------------------------------------------------------------------------------------- F1, MCC

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def _squad_tokens(text: str) -> list[str]:
    s = str(text).lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return s.split()


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 between one prediction and one reference (lower case, no punctuation/articles).

    Two empty answers score 1; one empty answer scores 0.
    """
    p, r = _squad_tokens(prediction), _squad_tokens(reference)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def binary_f1(predictions: Sequence[str], references: Sequence[str], positive_label: str) -> float:
    """F1 of the class ``positive_label`` (classification F1, as GLUE's MRPC reports it).

    Labels are compared after :func:`normalize_answer`. With no true and no predicted positives the
    score is 0.
    """
    _check_lengths(predictions, references)
    pos = normalize_answer(positive_label)
    preds = [normalize_answer(p) == pos for p in predictions]
    refs = [normalize_answer(r) == pos for r in references]
    tp = sum(p and r for p, r in zip(preds, refs))
    n_pred, n_ref = sum(preds), sum(refs)
    if tp == 0:
        return 0.0
    precision, recall = tp / n_pred, tp / n_ref
    return 2 * precision * recall / (precision + recall)


def f1(predictions: Sequence[str], references: Sequence[str], positive_label: str | None = None) -> float:
    """F1: binary F1 of ``positive_label`` when it is given (classification), else mean SQuAD token F1."""
    if positive_label is not None:
        return binary_f1(predictions, references, positive_label)
    _check_lengths(predictions, references)
    return sum(token_f1(p, r) for p, r in zip(predictions, references)) / len(predictions)


def matthews_corrcoef(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Matthews correlation coefficient (multi-class form, equal to the binary one for two classes).

    ``(c*s - sum_k p_k*t_k) / sqrt((s^2 - sum_k p_k^2) * (s^2 - sum_k t_k^2))`` with ``c`` correct
    predictions, ``s`` examples, ``p_k``/``t_k`` how often class ``k`` is predicted/true. Returns 0 when
    the denominator is 0 (e.g. a constant prediction), as scikit-learn does. Labels are compared after
    :func:`normalize_answer`.
    """
    _check_lengths(predictions, references)
    preds = [normalize_answer(p) for p in predictions]
    refs = [normalize_answer(r) for r in references]
    s = len(preds)
    c = sum(p == r for p, r in zip(preds, refs))
    pk, tk = Counter(preds), Counter(refs)
    classes = set(pk) | set(tk)
    cov_pt = c * s - sum(pk[k] * tk[k] for k in classes)
    cov_pp = s * s - sum(v * v for v in pk.values())
    cov_tt = s * s - sum(v * v for v in tk.values())
    if cov_pp == 0 or cov_tt == 0:
        return 0.0
    return cov_pt / math.sqrt(cov_pp * cov_tt)


# ------------------------------------------------------------------------------------------- ROUGE

_ROUGE_SCORER: Any = None


def _rouge_scorer() -> Any:
    global _ROUGE_SCORER
    if _ROUGE_SCORER is None:
        from rouge_score import rouge_scorer

        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _ROUGE_SCORER


def _rouge_l_one(prediction: str, reference: str) -> float:
    return float(_rouge_scorer().score(str(reference), str(prediction))["rougeL"].fmeasure)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (``rouge-score`` package, no stemming, its default tokenizer)."""
    _check_lengths(predictions, references)
    return sum(_rouge_l_one(p, r) for p, r in zip(predictions, references)) / len(predictions)


# --------------------------------------------------------------------------------------------- BBH

_ANSWER_IS = re.compile(r"the answer is\s*:?\s*", re.IGNORECASE)
_OPTION = re.compile(r"\(?([a-z])\)?")
_OPTION_PREFIX = re.compile(r"\(([a-z])\)\s")


def _first_line(text: str) -> str:
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return ""


def bbh_extract_answer(text: str) -> str:
    """Extract the answer from a BBH-style generation.

    Takes the text after the last "the answer is" (case-insensitive) up to the end of that line when
    present, else the first non-empty line; strips whitespace and trailing periods. Case is kept.
    """
    text = str(text)
    matches = list(_ANSWER_IS.finditer(text))
    seg = text[matches[-1].end() :].split("\n", 1)[0] if matches else _first_line(text)
    seg = seg.strip()
    while seg.endswith("."):
        seg = seg[:-1].rstrip()
    return seg


def _option_letter(s: str) -> str | None:
    m = _OPTION.fullmatch(s)
    if m:
        return m.group(1)
    m = _OPTION_PREFIX.match(s)
    return m.group(1) if m else None


def bbh_match(prediction: str, target: str) -> bool:
    """Whether a BBH generation answers ``target``.

    The answer is taken with :func:`bbh_extract_answer` and compared after :func:`normalize_answer`.
    For option targets like ``"(A)"`` the answers ``"(A)"``, ``"A"``, ``"A)"`` and ``"(A) text"`` all
    match.
    """
    pred = normalize_answer(bbh_extract_answer(prediction))
    ref = normalize_answer(target)
    if pred == ref:
        return True
    if re.fullmatch(r"\([a-z]\)", ref):
        return _option_letter(pred) == ref[1]
    return False


def bbh_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of BBH generations that match their target (see :func:`bbh_match`)."""
    _check_lengths(predictions, references)
    return sum(bbh_match(p, r) for p, r in zip(predictions, references)) / len(predictions)


# ------------------------------------------------------------------------------------------ numbers

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def extract_number(text: Any) -> float | None:
    """Extract the numeric answer from a generation (or a reference), or None when there is none.

    If the text says "the answer is", the first number after its last occurrence is taken (chain of
    thought style); otherwise the first number on the first non-empty line (answer-only style).
    Thousands separators are accepted (``"1,234.5"`` -> 1234.5). Numbers (int/float) pass through.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    text = str(text)
    matches = list(_ANSWER_IS.finditer(text)) or list(re.finditer(r"answer is", text, re.IGNORECASE))
    seg = text[matches[-1].end() :] if matches else _first_line(text)
    m = _NUMBER.search(seg)
    if not m:
        return None
    try:
        return float(m.group(0).replace(",", ""))
    except ValueError:  # pragma: no cover - the regex only matches parseable numbers
        return None


def numeric_match(prediction: str, reference: Any, tolerance: float = 1e-3) -> bool:
    """Whether the number extracted from ``prediction`` is within ``tolerance`` of the reference's."""
    ref = extract_number(reference)
    pred = extract_number(prediction)
    if ref is None:
        raise ValueError(f"reference {reference!r} holds no number")
    return pred is not None and abs(pred - ref) <= tolerance


def numeric_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of generations whose extracted number matches the reference (abs. tolerance 1e-3)."""
    _check_lengths(predictions, references)
    return sum(numeric_match(p, r) for p, r in zip(predictions, references)) / len(predictions)


def pearson(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Pearson correlation between the numbers in the predictions and in the references (STS-B).

    A prediction without a number counts as the mean of the references (it neither helps nor hurts
    the correlation's numerator). Returns 0 when either side is constant.
    """
    _check_lengths(predictions, references)
    ys: list[float] = []
    for r in references:
        v = extract_number(r)
        if v is None:
            raise ValueError(f"reference {r!r} holds no number")
        ys.append(v)
    mean_y = sum(ys) / len(ys)
    xs = [v if (v := extract_number(p)) is not None else mean_y for p in predictions]
    mean_x = sum(xs) / len(xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    sxx = sum((x - mean_x) ** 2 for x in xs)
    syy = sum((y - mean_y) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return 0.0
    return sxy / math.sqrt(sxx * syy)


# ----------------------------------------------------------------------------------------- registry

MetricFn = Callable[..., float]

#: Corpus metrics by name: ``fn(predictions, references, **options) -> float``.
METRICS: dict[str, MetricFn] = {
    "exact_match": exact_match,
    "accuracy": accuracy,
    "rouge_l": rouge_l,
    "f1": f1,
    "mcc": matthews_corrcoef,
    "bbh": bbh_accuracy,
    "numeric": numeric_accuracy,
    "pearson": pearson,
}

#: Per-example scores (1.0 = correct) for the metrics that have one; ``mcc`` and ``pearson`` are
#: corpus-level only, and :func:`score_example` falls back to normalized equality for them.
EXAMPLE_SCORERS: dict[str, Callable[[str, str], float]] = {
    "exact_match": lambda p, r: float(normalize_answer(p) == normalize_answer(r)),
    "accuracy": lambda p, r: float(normalize_answer(p) == normalize_answer(r)),
    "rouge_l": _rouge_l_one,
    "f1": token_f1,
    "bbh": lambda p, r: float(bbh_match(p, r)),
    "numeric": lambda p, r: float(numeric_match(p, r)),
}


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown metric {name!r}; available metrics: {sorted(METRICS)}")


def compute_metric(name: str, predictions: Sequence[str], references: Sequence[str], **options: Any) -> float:
    """Compute metric ``name`` (a key of :data:`METRICS`) over predictions and references.

    ``options`` go to the metric function (e.g. ``positive_label=`` for ``f1``).

    Raises:
        ValueError: unknown metric name, length mismatch or no examples.
    """
    if name not in METRICS:
        raise _unknown(name)
    return float(METRICS[name](predictions, references, **options))


def score_example(name: str, prediction: str, reference: str) -> float:
    """Score one prediction under metric ``name`` (1.0 = fully correct).

    Corpus-only metrics (``mcc``, ``pearson``) score normalized equality, or for ``pearson`` a
    numeric match.
    """
    if name not in METRICS:
        raise _unknown(name)
    if name == "pearson":
        return float(numeric_match(prediction, reference))
    scorer = EXAMPLE_SCORERS.get(name, EXAMPLE_SCORERS["exact_match"])
    return float(scorer(prediction, reference))
