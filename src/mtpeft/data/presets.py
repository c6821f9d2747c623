"""Named task presets for the shared datasets (``../shared/data``) and the built-in demo suite.

Preset names: ``bbh27`` (alias ``bbh``), ``bbh:<task>``, ``glue``, ``glue:<task>``, ``commonsense``,
``commonsense:<task>``, ``math``, ``math:<task>``, ``demo``, ``demo:<task>``; see
:func:`available_presets`. Sources are paths relative to the data root (``data_root=None`` keeps them
relative, to be resolved by ``load_task``; a given ``data_root`` is joined in).

Split policies:

* BBH (27 tasks): per task, shuffle with ``random.Random(0)``, eval = ``min(100, n // 3)``, train = the
  rest (4,350 train / 2,161 eval in total), as in ``docs/anchors.md``. Prompt ``Q: {input}\\nA:``,
  target `` {target}``, metric ``bbh``.
* GLUE: train = ``train.tsv``, eval = ``dev.tsv`` (test labels are not public). Classification by
  option log-likelihood over label words (``no``/``yes``, ``negative``/``positive``). CoLA: MCC
  (and accuracy); SST-2, RTE, WNLI: accuracy; MRPC: accuracy and binary F1 of ``yes``; STS-B:
  generation of the score with one decimal, Pearson correlation.
* Commonsense (LLM-Adapters files): multiple choice over the options named in each instruction's
  ``Answer format: a/b/...`` line (``true``/``false``, ``answer1``..., ``solution1``..., ``option1``...),
  target `` {answer}``, accuracy. BoolQ, ARC-e/c and OBQA use their ``train.json``/``test.json``;
  PIQA, SIQA and WinoGrande ship only ``test.json``, split with seed 0 (eval = n // 3).
* Math (LLM-Adapters files, ``test.json`` only, split with seed 0, eval = n // 3): GSM8K, AddSub,
  MultiArith, SingleEq, SVAMP, MAWPS as answer-only generation of the number (``"576.0"`` is trained
  as ``576``), metric ``numeric`` (number extraction, tolerance 1e-3); AQuA and MathQA as multiple
  choice over ``A``-``E``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from .tasks import TaskSpec

__all__ = [
    "BBH_TASKS",
    "GLUE_TASKS",
    "COMMONSENSE_TASKS",
    "MATH_TASKS",
    "bbh_task",
    "bbh_tasks",
    "glue_task",
    "glue_tasks",
    "commonsense_task",
    "commonsense_tasks",
    "math_task",
    "math_tasks",
    "preset",
    "presets",
    "available_presets",
]

#: The 27 BIG-Bench-Hard tasks (file stems of ``bbh/bbh/*.json``).
BBH_TASKS: tuple[str, ...] = (
    "boolean_expressions",
    "causal_judgement",
    "date_understanding",
    "disambiguation_qa",
    "dyck_languages",
    "formal_fallacies",
    "geometric_shapes",
    "hyperbaton",
    "logical_deduction_five_objects",
    "logical_deduction_seven_objects",
    "logical_deduction_three_objects",
    "movie_recommendation",
    "multistep_arithmetic_two",
    "navigate",
    "object_counting",
    "penguins_in_a_table",
    "reasoning_about_colored_objects",
    "ruin_names",
    "salient_translation_error_detection",
    "snarks",
    "sports_understanding",
    "temporal_sequences",
    "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects",
    "tracking_shuffled_objects_three_objects",
    "web_of_lies",
    "word_sorting",
)

_ONE_THIRD = 1 / 3


def _src(data_root: str | Path | None, rel: str) -> str:
    return rel if data_root is None else str(Path(data_root) / rel)


def _check(name: str, known: Sequence[str], group: str) -> None:
    if name not in known:
        raise ValueError(f"unknown {group} task {name!r}; available: {list(known)}")


# -------------------------------------------------------------------------------------------- BBH


def bbh_task(name: str, data_root: str | Path | None = None) -> TaskSpec:
    """Spec of one BBH task (split seed 0, eval = min(100, n // 3), metric ``bbh``)."""
    _check(name, BBH_TASKS, "BBH")
    return TaskSpec(
        name=name,
        source=_src(data_root, f"bbh/bbh/{name}.json"),
        type="generation",
        prompt="Q: {input}\nA:",
        target=" {target}",
        metric="bbh",
        test_size=_ONE_THIRD,
        test_size_max=100,
        seed=0,
        description=f"BIG-Bench-Hard {name}",
    )


def bbh_tasks(data_root: str | Path | None = None, names: Sequence[str] | None = None) -> list[TaskSpec]:
    """Specs of all 27 BBH tasks (or ``names``)."""
    return [bbh_task(n, data_root) for n in (BBH_TASKS if names is None else names)]


# ------------------------------------------------------------------------------------------- GLUE

_PAIR_PROMPT = "Sentence 1: {sentence1}\nSentence 2: {sentence2}\n"
_ENTAIL_PROMPT = (
    "Premise: {sentence1}\nHypothesis: {sentence2}\nDoes the premise entail the hypothesis? Answer:"
)
_NO_YES = {"0": "no", "1": "yes"}

_GLUE: dict[str, Callable[[str | Path | None], TaskSpec]] = {
    "cola": lambda r: TaskSpec(
        name="cola",
        source=_src(r, "glue/CoLA/train.tsv"),
        eval_source=_src(r, "glue/CoLA/dev.tsv"),
        columns=["source", "label", "original_label", "sentence"],
        tsv_header=False,
        type="classification",
        prompt="Sentence: {sentence}\nIs this sentence grammatically acceptable? Answer:",
        target=" {label}",
        labels=["no", "yes"],
        label_map=_NO_YES,
        metric="mcc",
        extra_metrics=["accuracy"],
        description="GLUE CoLA (train.tsv/dev.tsv have no header)",
    ),
    "sst2": lambda r: TaskSpec(
        name="sst2",
        source=_src(r, "glue/SST-2/train.tsv"),
        eval_source=_src(r, "glue/SST-2/dev.tsv"),
        type="classification",
        prompt="Review: {sentence}\nSentiment:",
        target=" {label}",
        labels=["negative", "positive"],
        label_map={"0": "negative", "1": "positive"},
        metric="accuracy",
        description="GLUE SST-2",
    ),
    "mrpc": lambda r: TaskSpec(
        name="mrpc",
        source=_src(r, "glue/MRPC/train.tsv"),
        eval_source=_src(r, "glue/MRPC/dev.tsv"),
        fields={"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"},
        type="classification",
        prompt=_PAIR_PROMPT + "Do both sentences mean the same thing? Answer:",
        target=" {label}",
        labels=["no", "yes"],
        label_map=_NO_YES,
        positive_label="yes",
        metric="accuracy",
        extra_metrics=["f1"],
        description="GLUE MRPC",
    ),
    "stsb": lambda r: TaskSpec(
        name="stsb",
        source=_src(r, "glue/STS-B/train.tsv"),
        eval_source=_src(r, "glue/STS-B/dev.tsv"),
        type="generation",
        prompt=_PAIR_PROMPT + "Similarity from 0 to 5:",
        target=" {score}",
        transform="one_decimal_score",
        metric="pearson",
        description="GLUE STS-B as generation of the score (one decimal), Pearson correlation",
    ),
    "rte": lambda r: TaskSpec(
        name="rte",
        source=_src(r, "glue/RTE/train.tsv"),
        eval_source=_src(r, "glue/RTE/dev.tsv"),
        type="classification",
        prompt=_ENTAIL_PROMPT,
        target=" {label}",
        labels=["no", "yes"],
        label_map={"not_entailment": "no", "entailment": "yes"},
        metric="accuracy",
        description="GLUE RTE",
    ),
    "wnli": lambda r: TaskSpec(
        name="wnli",
        source=_src(r, "glue/WNLI/train.tsv"),
        eval_source=_src(r, "glue/WNLI/dev.tsv"),
        type="classification",
        prompt=_ENTAIL_PROMPT,
        target=" {label}",
        labels=["no", "yes"],
        label_map=_NO_YES,
        metric="accuracy",
        description="GLUE WNLI",
    ),
}
#: GLUE task names (the ones shipped in ``glue/``).
GLUE_TASKS: tuple[str, ...] = tuple(_GLUE)


def glue_task(name: str, data_root: str | Path | None = None) -> TaskSpec:
    """Spec of one GLUE task (train.tsv -> dev.tsv)."""
    _check(name, GLUE_TASKS, "GLUE")
    return _GLUE[name](data_root)


def glue_tasks(data_root: str | Path | None = None, names: Sequence[str] | None = None) -> list[TaskSpec]:
    """Specs of the GLUE tasks (or ``names``)."""
    return [glue_task(n, data_root) for n in (GLUE_TASKS if names is None else names)]


# ------------------------------------------------------------------------------------ commonsense

#: name -> (folder, has train.json)
_COMMONSENSE: dict[str, tuple[str, bool]] = {
    "boolq": ("boolq", True),
    "piqa": ("piqa", False),
    "siqa": ("social_i_qa", False),
    "winogrande": ("winogrande", False),
    "arc_easy": ("ARC-Easy", True),
    "arc_challenge": ("ARC-Challenge", True),
    "obqa": ("openbookqa", True),
}
#: Commonsense task names.
COMMONSENSE_TASKS: tuple[str, ...] = tuple(_COMMONSENSE)


def commonsense_task(name: str, data_root: str | Path | None = None) -> TaskSpec:
    """Spec of one LLM-Adapters commonsense task (multiple choice over the instruction's answer format)."""
    _check(name, COMMONSENSE_TASKS, "commonsense")
    folder, has_train = _COMMONSENSE[name]
    base = f"commonsense_math/{folder}"
    split_kw: dict[str, object] = (
        {"source": _src(data_root, f"{base}/train.json"), "eval_source": _src(data_root, f"{base}/test.json")}
        if has_train
        else {"source": _src(data_root, f"{base}/test.json"), "test_size": _ONE_THIRD}
    )
    return TaskSpec(
        name=name,
        type="multiple_choice",
        prompt="{instruction}\nAnswer:",
        target=" {answer}",
        options_field="options",
        transform="llm_adapters_options",
        metric="accuracy",
        seed=0,
        description=f"LLM-Adapters {folder}",
        **split_kw,  # type: ignore[arg-type]
    )


def commonsense_tasks(
    data_root: str | Path | None = None, names: Sequence[str] | None = None
) -> list[TaskSpec]:
    """Specs of the commonsense tasks (or ``names``)."""
    return [commonsense_task(n, data_root) for n in (COMMONSENSE_TASKS if names is None else names)]


# ------------------------------------------------------------------------------------------- math

#: name -> (folder, answered by a letter A-E)
_MATH: dict[str, tuple[str, bool]] = {
    "gsm8k": ("gsm8k", False),
    "addsub": ("AddSub", False),
    "multiarith": ("MultiArith", False),
    "singleeq": ("SingleEq", False),
    "svamp": ("SVAMP", False),
    "mawps": ("mawps", False),
    "aqua": ("AQuA", True),
    "mathqa": ("mathqa", True),
}
#: Math task names.
MATH_TASKS: tuple[str, ...] = tuple(_MATH)


def math_task(name: str, data_root: str | Path | None = None) -> TaskSpec:
    """Spec of one LLM-Adapters math task (answer-only; numeric match, or A-E multiple choice)."""
    _check(name, MATH_TASKS, "math")
    folder, lettered = _MATH[name]
    common = {
        "name": name,
        "source": _src(data_root, f"commonsense_math/{folder}/test.json"),
        "prompt": "Q: {instruction}\nA:",
        "target": " {answer}",
        "test_size": _ONE_THIRD,
        "seed": 0,
        "description": f"LLM-Adapters {folder} (test.json split with seed 0)",
    }
    if lettered:
        return TaskSpec(
            **common, type="multiple_choice", options=["A", "B", "C", "D", "E"], metric="accuracy"
        )  # type: ignore[arg-type]
    return TaskSpec(**common, type="generation", transform="numeric_answer", metric="numeric")  # type: ignore[arg-type]


def math_tasks(data_root: str | Path | None = None, names: Sequence[str] | None = None) -> list[TaskSpec]:
    """Specs of the math tasks (or ``names``)."""
    return [math_task(n, data_root) for n in (MATH_TASKS if names is None else names)]


# ----------------------------------------------------------------------------------------- lookup


def _demo_specs(names: Sequence[str] | None = None) -> list[TaskSpec]:
    from .builtin import demo_specs

    return demo_specs(names=names)


def _demo_names() -> tuple[str, ...]:
    from .builtin import DEMO_TASKS

    return tuple(DEMO_TASKS)


_GROUPS: dict[str, tuple[Callable[[], Sequence[str]], Callable[..., list[TaskSpec]]]] = {
    "bbh": (lambda: BBH_TASKS, lambda root, names=None: bbh_tasks(root, names)),
    "glue": (lambda: GLUE_TASKS, lambda root, names=None: glue_tasks(root, names)),
    "commonsense": (lambda: COMMONSENSE_TASKS, lambda root, names=None: commonsense_tasks(root, names)),
    "math": (lambda: MATH_TASKS, lambda root, names=None: math_tasks(root, names)),
    "demo": (_demo_names, lambda root, names=None: _demo_specs(names)),
}
_ALIASES = {"bbh27": "bbh"}


def available_presets() -> list[str]:
    """All preset names: the groups (``bbh27``, ``bbh``, ``glue``, ``commonsense``, ``math``, ``demo``)
    and every ``group:task``."""
    out = ["bbh27", *_GROUPS]
    for group, (names, _) in _GROUPS.items():
        out += [f"{group}:{n}" for n in names()]
    return out


def preset(name: str, data_root: str | Path | None = None) -> list[TaskSpec]:
    """Task specs of preset ``name`` (see :func:`available_presets`), e.g. ``"bbh27"``,
    ``"bbh:boolean_expressions"``, ``"glue"``, ``"math:gsm8k"``.

    Raises:
        ValueError: unknown preset (the message lists the groups and how to name a single task).
    """
    group, _, task = name.strip().partition(":")
    group = _ALIASES.get(group, group)
    if group not in _GROUPS:
        raise ValueError(
            f"unknown preset {name!r}; available groups: {['bbh27', *_GROUPS]}, or 'group:task' "
            "(see available_presets())"
        )
    names_fn, build = _GROUPS[group]
    if not task:
        return build(data_root)
    if task not in names_fn():
        raise ValueError(f"unknown task {task!r} in preset group {group!r}; available: {list(names_fn())}")
    return build(data_root, [task])


def presets(names: Sequence[str], data_root: str | Path | None = None) -> list[TaskSpec]:
    """Concatenate several presets (e.g. ``["glue", "bbh:navigate"]``); task names must not repeat."""
    specs: list[TaskSpec] = []
    for n in names:
        specs += preset(n, data_root)
    counts: dict[str, int] = {}
    for s in specs:
        counts[s.name] = counts.get(s.name, 0) + 1
    dupes = sorted(n for n, c in counts.items() if c > 1)
    if dupes:
        raise ValueError(f"presets {list(names)} repeat task names {dupes}")
    return specs
