"""Named task presets: the shared benchmark datasets (BBH, GLUE, commonsense, math) under the data root, and
groups that other modules register (the built-in demo suite, :mod:`mtpeft.data.builtin`).

Preset names: ``bbh27`` (alias ``bbh``), ``bbh:<task>``, ``glue``, ``glue:<task>``, ``commonsense``,
``commonsense:<task>``, ``math``, ``math:<task>``, ``demo``, ``demo:<task>``, and ``group:a,b`` for several tasks
of a group; see :func:`available_presets`. Sources are paths relative to the data root (``data_root=None`` keeps
them relative, to be resolved by ``load_task`` against ``data.root`` or ``$MTPEFT_DATA_ROOT``; a given
``data_root`` is joined in).

Split policies:

* BBH (27 tasks): per task, shuffle with ``random.Random(0)``, eval = ``min(100, n // 3)``, train = the
  rest (4,350 train / 2,161 eval in total). Prompt ``Q: {input}\\nA:``, target `` {target}``, metric ``bbh``.
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

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .spec import TaskSpec

__all__ = [
    "BBH_TASKS",
    "GLUE_TASKS",
    "COMMONSENSE_TASKS",
    "MATH_TASKS",
    "PresetGroup",
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
    "register_preset_group",
]

#: The 27 BIG-Bench-Hard tasks (file stems of ``bbh/bbh/*.json``).
BBH_TASKS: tuple[str, ...] = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa", "dyck_languages",
    "formal_fallacies", "geometric_shapes", "hyperbaton", "logical_deduction_five_objects",
    "logical_deduction_seven_objects", "logical_deduction_three_objects", "movie_recommendation",
    "multistep_arithmetic_two", "navigate", "object_counting", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "sports_understanding", "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects", "web_of_lies",
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
_ENTAIL_PROMPT = "Premise: {sentence1}\nHypothesis: {sentence2}\nDoes the premise entail the hypothesis? Answer:"
_NO_YES = {"0": "no", "1": "yes"}

#: name -> the spec's fields where they differ from a yes/no classification by accuracy over ``glue/<folder>/``.
_GLUE: dict[str, dict[str, Any]] = {
    "cola": {"folder": "CoLA", "prompt": "Sentence: {sentence}\nIs this sentence grammatically acceptable? Answer:",
             "columns": ["source", "label", "original_label", "sentence"], "tsv_header": False, "metric": "mcc",
             "extra_metrics": ["accuracy"], "description": "GLUE CoLA (train.tsv/dev.tsv have no header)"},
    "sst2": {"folder": "SST-2", "prompt": "Review: {sentence}\nSentiment:", "labels": ["negative", "positive"],
             "label_map": {"0": "negative", "1": "positive"}},
    "mrpc": {"folder": "MRPC", "prompt": _PAIR_PROMPT + "Do both sentences mean the same thing? Answer:",
             "fields": {"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"},
             "positive_label": "yes", "extra_metrics": ["f1"]},
    "stsb": {"folder": "STS-B", "prompt": _PAIR_PROMPT + "Similarity from 0 to 5:", "type": "generation",
             "target": " {score}", "labels": None, "label_map": None, "transform": "one_decimal_score",
             "metric": "pearson",
             "description": "GLUE STS-B as generation of the score (one decimal), Pearson correlation"},
    "rte": {"folder": "RTE", "prompt": _ENTAIL_PROMPT, "label_map": {"not_entailment": "no", "entailment": "yes"}},
    "wnli": {"folder": "WNLI", "prompt": _ENTAIL_PROMPT},
}
#: GLUE task names (the ones shipped in ``glue/``).
GLUE_TASKS: tuple[str, ...] = tuple(_GLUE)


def glue_task(name: str, data_root: str | Path | None = None) -> TaskSpec:
    """Spec of one GLUE task (train.tsv -> dev.tsv)."""
    _check(name, GLUE_TASKS, "GLUE")
    fields = copy.deepcopy(_GLUE[name])
    folder = fields.pop("folder")
    spec = {"type": "classification", "target": " {label}", "labels": ["no", "yes"], "label_map": dict(_NO_YES),
            "metric": "accuracy", "description": f"GLUE {folder}", **fields}
    return TaskSpec(name=name, source=_src(data_root, f"glue/{folder}/train.tsv"),
                    eval_source=_src(data_root, f"glue/{folder}/dev.tsv"), **spec)


def glue_tasks(data_root: str | Path | None = None, names: Sequence[str] | None = None) -> list[TaskSpec]:
    """Specs of the GLUE tasks (or ``names``)."""
    return [glue_task(n, data_root) for n in (GLUE_TASKS if names is None else names)]


# ------------------------------------------------------------------------- commonsense and math

#: name -> folder under ``commonsense_math/`` (LLM-Adapters' commonsense sets)
_COMMONSENSE = {"boolq": "boolq", "piqa": "piqa", "siqa": "social_i_qa", "winogrande": "winogrande",
                "arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge", "obqa": "openbookqa"}
_COMMONSENSE_WITH_TRAIN = {"boolq", "arc_easy", "arc_challenge", "obqa"}  # the others ship only test.json
#: Commonsense task names.
COMMONSENSE_TASKS: tuple[str, ...] = tuple(_COMMONSENSE)

#: name -> folder under ``commonsense_math/`` (LLM-Adapters' math sets; all ship only test.json)
_MATH = {"gsm8k": "gsm8k", "addsub": "AddSub", "multiarith": "MultiArith", "singleeq": "SingleEq",
         "svamp": "SVAMP", "mawps": "mawps", "aqua": "AQuA", "mathqa": "mathqa"}
_MATH_LETTERED = {"aqua", "mathqa"}  # answered by a letter A-E
#: Math task names.
MATH_TASKS: tuple[str, ...] = tuple(_MATH)


def _llm_adapters_task(name: str, folder: str, data_root: str | Path | None, has_train: bool,
                       **fields: Any) -> TaskSpec:
    """An LLM-Adapters task: ``train.json`` -> ``test.json``, or ``test.json`` split with seed 0 (eval = n // 3)."""
    base = f"commonsense_math/{folder}"
    split: dict[str, Any] = (
        {"source": _src(data_root, f"{base}/train.json"), "eval_source": _src(data_root, f"{base}/test.json")}
        if has_train
        else {"source": _src(data_root, f"{base}/test.json"), "test_size": _ONE_THIRD}
    )
    return TaskSpec(name=name, target=" {answer}", seed=0, **split, **fields)


def commonsense_task(name: str, data_root: str | Path | None = None) -> TaskSpec:
    """Spec of one LLM-Adapters commonsense task (multiple choice over the instruction's answer format)."""
    _check(name, COMMONSENSE_TASKS, "commonsense")
    folder = _COMMONSENSE[name]
    return _llm_adapters_task(name, folder, data_root, name in _COMMONSENSE_WITH_TRAIN, type="multiple_choice",
                              prompt="{instruction}\nAnswer:", options_field="options",
                              transform="llm_adapters_options", metric="accuracy",
                              description=f"LLM-Adapters {folder}")


def commonsense_tasks(data_root: str | Path | None = None, names: Sequence[str] | None = None) -> list[TaskSpec]:
    """Specs of the commonsense tasks (or ``names``)."""
    return [commonsense_task(n, data_root) for n in (COMMONSENSE_TASKS if names is None else names)]


def math_task(name: str, data_root: str | Path | None = None) -> TaskSpec:
    """Spec of one LLM-Adapters math task (answer-only; numeric match, or A-E multiple choice)."""
    _check(name, MATH_TASKS, "math")
    folder = _MATH[name]
    answer: dict[str, Any] = (
        {"type": "multiple_choice", "options": ["A", "B", "C", "D", "E"], "metric": "accuracy"}
        if name in _MATH_LETTERED
        else {"type": "generation", "transform": "numeric_answer", "metric": "numeric"}
    )
    return _llm_adapters_task(name, folder, data_root, False, prompt="Q: {instruction}\nA:",
                              description=f"LLM-Adapters {folder} (test.json split with seed 0)", **answer)


def math_tasks(data_root: str | Path | None = None, names: Sequence[str] | None = None) -> list[TaskSpec]:
    """Specs of the math tasks (or ``names``)."""
    return [math_task(n, data_root) for n in (MATH_TASKS if names is None else names)]


# ----------------------------------------------------------------------------------------- groups

#: ``build(data_root, names, seed)``: the specs of a group's tasks (``names=None``: all of them). ``seed`` is the
#: run's seed, for groups whose tasks are generated from it; the shared-data groups split with a fixed seed.
GroupBuilder = Callable[[str | Path | None, Sequence[str] | None, int | None], list[TaskSpec]]


@dataclass(frozen=True)
class PresetGroup:
    """A named group of presets: its task names and how to build their specs."""

    tasks: tuple[str, ...]
    build: GroupBuilder


_GROUPS: dict[str, PresetGroup] = {}
_ALIASES = {"bbh27": "bbh"}


def register_preset_group(name: str, tasks: Sequence[str], build: GroupBuilder) -> PresetGroup:
    """Make ``name`` and ``name:<task>`` presets (see :func:`preset`)."""
    if name in _GROUPS or name in _ALIASES or not name or ":" in name:
        raise ValueError(f"cannot register a preset group named {name!r} (taken, or not a plain name)")
    _GROUPS[name] = PresetGroup(tuple(tasks), build)
    return _GROUPS[name]


register_preset_group("bbh", BBH_TASKS, lambda root, names, seed: bbh_tasks(root, names))
register_preset_group("glue", GLUE_TASKS, lambda root, names, seed: glue_tasks(root, names))
register_preset_group("commonsense", COMMONSENSE_TASKS, lambda root, names, seed: commonsense_tasks(root, names))
register_preset_group("math", MATH_TASKS, lambda root, names, seed: math_tasks(root, names))


def available_presets() -> list[str]:
    """All preset names: the groups (``bbh27``, ``bbh``, ``glue``, ``commonsense``, ``math``, ``demo``)
    and every ``group:task``."""
    out = ["bbh27", *_GROUPS]
    for group, found in _GROUPS.items():
        out += [f"{group}:{n}" for n in found.tasks]
    return out


def preset(name: str, data_root: str | Path | None = None, *, seed: int | None = None) -> list[TaskSpec]:
    """Task specs of preset ``name`` (see :func:`available_presets`), e.g. ``"bbh27"``,
    ``"bbh:boolean_expressions"``, ``"glue"``, ``"math:gsm8k"``, ``"demo:arithmetic,reverse"``. ``seed``
    reaches groups generated from the run's seed (``demo``; default 0).

    Raises:
        ValueError: unknown preset (the message lists the groups and how to name a single task).
    """
    group, _, tasks = name.strip().partition(":")
    group = _ALIASES.get(group, group)
    if group not in _GROUPS:
        raise ValueError(
            f"unknown preset {name!r}; available groups: {['bbh27', *_GROUPS]}, or 'group:task' "
            "(see available_presets())"
        )
    found = _GROUPS[group]
    if not tasks:
        return found.build(data_root, None, seed)
    names = tasks.split(",")
    unknown = [t for t in names if t not in found.tasks]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r} in preset group {group!r}; available: {list(found.tasks)}")
    return found.build(data_root, names, seed)


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
