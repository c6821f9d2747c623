"""A built-in suite of small heterogeneous tasks, generated deterministically from a seed (no files).

The tasks are made to be learnable by a ~135M-parameter instruct model with a LoRA in a few hundred
optimizer steps on CPU, while an untrained model scores clearly lower (mostly because it does not
answer in the expected short form). Targets are 1-3 tokens and scored by exact match, except the
classification and multiple-choice tasks, scored by option log-likelihood.

Measured (SmolLM2-135M-Instruct, fp32, CPU; HF PEFT LoRA r=8 on all seven projections, AdamW lr 1e-3,
150 steps of batch 8, uniform mixing, 240 train / 50 eval examples per task, seed 0): macro score
26.4% untrained -> 93.2% trained (sentiment 98 -> 100, arithmetic 0 -> 66, reverse 0 -> 100, extract
0 -> 100, category 34 -> 100). Sentiment is nearly solved by the untrained model through option
likelihood; it stays in the suite as the control task.

Tasks (prompt -> answer):

* ``sentiment`` (classification): ``Review: The pizza was not bland at all.\\nSentiment:`` -> ``positive``
  (negation and "but"/"although" contrast clauses decide the label);
* ``arithmetic`` (generation): ``Add: 12+7=`` -> ``19`` (numbers below 100);
* ``reverse`` (generation): ``Reverse the words: cat blue tree\\nAnswer:`` -> ``tree blue cat``;
* ``extract`` (generation): ``Anna flew to Berlin on Monday.\\nCity:`` -> ``Berlin``;
* ``category`` (multiple choice): ``Which of these is an animal: chair, tiger, spoon?\\nAnswer:``
  -> ``tiger``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .loaders import Record
from .presets import register_preset_group
from .sources import SourceKind, register_source
from .spec import TaskData, TaskSpec
from .tasks import load_task

__all__ = ["DEMO_TASKS", "DEFAULT_N_TRAIN", "DEFAULT_N_EVAL", "DemoTask", "demo_specs", "demo_tasks",
           "builtin_records"]

#: Default number of generated train / eval examples per task.
DEFAULT_N_TRAIN = 240
DEFAULT_N_EVAL = 50

# ------------------------------------------------------------------------------------- word lists

_SUBJECTS = [
    "the movie", "the pizza", "the hotel", "this phone", "the concert", "the book", "the service", "the coffee",
    "the game", "the laptop", "the museum", "the pasta", "the show", "the room", "the staff", "the music", "the trip",
    "the headphones", "the bakery", "the camera",
]
_POSITIVE = [
    "great", "wonderful", "excellent", "delicious", "amazing", "lovely", "fantastic", "superb", "brilliant", "friendly",
    "perfect", "enjoyable", "charming", "fabulous",
]
_NEGATIVE = [
    "terrible", "awful", "boring", "horrible", "disappointing", "bland", "rude", "dreadful", "noisy", "broken", "dirty",
    "useless", "annoying", "mediocre",
]
_WORDS = [
    "cat", "dog", "sun", "tree", "blue", "red", "book", "fish", "milk", "door", "hat", "car", "bird", "cake", "rain",
    "star", "moon", "lamp", "ship", "gold", "snow", "king", "road", "rock", "wind", "bell", "coin", "frog", "leaf",
    "ring", "salt", "wolf", "corn", "desk", "fire", "lake", "nest", "pear", "rose", "sand", "town", "wall", "year",
    "bear", "boat", "cup", "egg", "map", "pen", "box",
]
_NAMES = [
    "Anna", "Tom", "Maria", "David", "Sara", "James", "Lucy", "Peter", "Emma", "John", "Laura", "Mark", "Nina", "Paul",
    "Kate", "Alex", "Julia", "Leo", "Mia", "Sam",
]
_CITIES = [
    "Paris", "Berlin", "London", "Rome", "Madrid", "Tokyo", "Boston", "Chicago", "Dublin", "Vienna", "Prague", "Lisbon",
    "Sydney", "Toronto", "Moscow", "Cairo", "Athens", "Oslo", "Seattle", "Denver", "Miami", "Munich", "Milan", "Warsaw",
    "Dallas", "Houston", "Amsterdam", "Brussels", "Geneva", "Zurich",
]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_EXTRACT_TEMPLATES = [
    "{name} flew to {city} on {day} to meet {name2}.",
    "On {day}, {name} took the train to {city} with {n} friends.",
    "{name} has lived in {city} for {n} years.",
    "The conference in {city} starts on {day}, said {name}.",
    "{name} and {name2} opened a small shop in {city}.",
    "Last {day} {name} visited {city} for the first time.",
]
_CATEGORIES: dict[str, list[str]] = {
    "an animal": ["tiger", "horse", "rabbit", "lion", "sheep", "monkey", "zebra", "eagle", "mouse", "goat"],
    "a fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "orange", "plum", "melon"],
    "a color": ["red", "green", "purple", "yellow", "brown", "pink", "black", "white", "gray", "blue"],
    "a tool": ["hammer", "saw", "wrench", "drill", "shovel", "chisel", "pliers", "rake", "axe", "ladder"],
    "a vehicle": ["truck", "bus", "bicycle", "train", "taxi", "tractor", "scooter", "van", "airplane", "tram"],
    "a body part": ["elbow", "knee", "finger", "shoulder", "ankle", "nose", "ear", "chin", "wrist", "thumb"],
}

# ------------------------------------------------------------------------------------- generators

Generator = Callable[[random.Random], dict[str, Any]]


@dataclass(frozen=True)
class DemoTask:
    """One built-in task: its record generator, what makes two records the same (for distinct examples), and the
    fields of its spec besides name and source."""

    generate: Generator
    identity: Callable[[dict[str, Any]], str]
    spec: dict[str, Any] = field(default_factory=dict)


#: name -> the built-in task, in suite order.
DEMO_TASKS: dict[str, DemoTask] = {}


def _demo_task(name: str, identity: Callable[[dict[str, Any]], str], **spec: Any) -> Callable[[Generator], Generator]:
    """Register the decorated record generator as the built-in task ``name`` with these spec fields."""

    def deco(generate: Generator) -> Generator:
        DEMO_TASKS[name] = DemoTask(generate, identity, spec)
        return generate

    return deco


@_demo_task("sentiment", lambda r: r["text"], type="classification", prompt="Review: {text}\nSentiment:",
            target=" {label}", labels=["negative", "positive"], metric="accuracy",
            description="positive/negative review sentences, with negation and contrast clauses")
def _sentiment(rng: random.Random) -> dict[str, Any]:
    s1, s2 = rng.sample(_SUBJECTS, 2)
    label = rng.choice(["positive", "negative"])
    good, bad = rng.choice(_POSITIVE), rng.choice(_NEGATIVE)
    adj, other = (good, bad) if label == "positive" else (bad, good)
    form = rng.randrange(4)
    if form == 0:
        text = f"{s1.capitalize()} was {adj}."
    elif form == 1:  # negation flips the adjective
        text = f"{s1.capitalize()} was not {other} at all."
    elif form == 2:  # contrast: the clause after "but" decides
        text = f"{s1.capitalize()} was {other}, but {s2} was {adj}."
    else:
        text = f"Although {s1} was {other}, {s2} was {adj}."
    return {"text": text, "label": label}


@_demo_task("arithmetic", lambda r: f"{r['a']}+{r['b']}", prompt="Add: {a}+{b}=", target=" {answer}",
            metric="exact_match", description="sum of two numbers below 100")
def _arithmetic(rng: random.Random) -> dict[str, Any]:
    a, b = rng.randrange(100), rng.randrange(100)
    return {"a": a, "b": b, "answer": str(a + b)}


@_demo_task("reverse", lambda r: r["words"], prompt="Reverse the words: {words}\nAnswer:", target=" {answer}",
            metric="exact_match", description="write three words in reverse order")
def _reverse(rng: random.Random) -> dict[str, Any]:
    words = rng.sample(_WORDS, 3)
    return {"words": " ".join(words), "answer": " ".join(reversed(words))}


@_demo_task("extract", lambda r: r["sentence"], prompt="{sentence}\nCity:", target=" {city}",
            metric="exact_match", description="copy the city named in a sentence")
def _extract(rng: random.Random) -> dict[str, Any]:
    name, name2 = rng.sample(_NAMES, 2)
    city = rng.choice(_CITIES)
    tmpl = rng.choice(_EXTRACT_TEMPLATES)
    sentence = tmpl.format(name=name, name2=name2, city=city, day=rng.choice(_DAYS), n=rng.randrange(2, 12))
    return {"sentence": sentence, "city": city}


@_demo_task("category", lambda r: f"{r['category']}|{r['choices']}", type="multiple_choice",
            prompt="Which of these is {category}: {choices}?\nAnswer:", target=" {answer}", options_field="options",
            metric="accuracy", description="pick the word of the named category among three")
def _category(rng: random.Random) -> dict[str, Any]:
    cat, *others = rng.sample(sorted(_CATEGORIES), 3)
    answer = rng.choice(_CATEGORIES[cat])
    distractors = [rng.choice([w for w in _CATEGORIES[o] if w != answer]) for o in others]
    options = [answer, *distractors]
    rng.shuffle(options)
    return {"category": cat, "options": options, "choices": ", ".join(options), "answer": answer}


def _task_seed(seed: int, name: str) -> int:
    # Stable across processes (str hash is salted): derive from the name's bytes.
    return seed * 1_000_003 + sum((i + 1) * b for i, b in enumerate(name.encode()))


def _generate(name: str, seed: int, n: int) -> list[dict[str, Any]]:
    task = DEMO_TASKS[name]
    rng = random.Random(_task_seed(seed, name))
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"demo task {name!r}: cannot generate {n} distinct examples (got {len(out)})")
        rec = task.generate(rng)
        k = task.identity(rec)
        if k in seen:
            continue
        seen.add(k)
        out.append(rec)
    return out


def builtin_records(spec: TaskSpec, name: str | None = None) -> tuple[list[Record], list[Record]]:
    """Generate the train and eval records of a ``builtin:<name>`` spec (disjoint, deterministic).

    ``name`` defaults to the part of ``spec.source`` after ``builtin:``. Counts are ``spec.max_train`` /
    ``spec.max_eval`` (defaults :data:`DEFAULT_N_TRAIN` / :data:`DEFAULT_N_EVAL`); the generator seed is
    ``spec.seed``.
    """
    name = spec.source.split(":", 1)[1] if name is None else name
    if name not in DEMO_TASKS:
        raise ValueError(f"task {spec.name!r}: unknown builtin task {name!r}; available: {sorted(DEMO_TASKS)}")
    if spec.eval_source is not None or spec.eval_split is not None or spec.test_size is not None:
        raise ValueError(
            f"task {spec.name!r}: builtin tasks generate disjoint train/eval sets themselves; "
            "set max_train/max_eval instead of eval_source, eval_split or test_size"
        )
    n_train = DEFAULT_N_TRAIN if spec.max_train is None else spec.max_train
    n_eval = DEFAULT_N_EVAL if spec.max_eval is None else spec.max_eval
    recs = _generate(name, spec.seed, n_train + n_eval)
    where = f"builtin:{name}(seed={spec.seed})"
    train = [Record(r, where, i + 1, i, "row") for i, r in enumerate(recs[:n_train])]
    evals = [Record(r, where, n_train + i + 1, n_train + i, "row") for i, r in enumerate(recs[n_train:])]
    return train, evals


def demo_specs(
    seed: int = 0,
    n_train: int = DEFAULT_N_TRAIN,
    n_eval: int = DEFAULT_N_EVAL,
    names: Sequence[str] | None = None,
) -> list[TaskSpec]:
    """Specs of the demo suite (all tasks, or ``names``) with the given seed and sizes."""
    chosen = list(DEMO_TASKS) if names is None else list(names)
    unknown = [n for n in chosen if n not in DEMO_TASKS]
    if unknown:
        raise ValueError(f"unknown demo task(s) {unknown}; available: {list(DEMO_TASKS)}")
    return [TaskSpec(name=n, source=f"builtin:{n}", seed=seed, max_train=n_train, max_eval=n_eval,
                     **DEMO_TASKS[n].spec) for n in chosen]


def demo_tasks(
    seed: int = 0,
    n_train: int = DEFAULT_N_TRAIN,
    n_eval: int = DEFAULT_N_EVAL,
    names: Sequence[str] | None = None,
) -> list[tuple[TaskSpec, TaskData]]:
    """Build the demo suite: ``(spec, data)`` per task, deterministic in ``seed``.

    Train and eval examples of a task never share a prompt.
    """
    return [(spec, load_task(spec)) for spec in demo_specs(seed, n_train, n_eval, names)]


# ``builtin:<task>`` sources, and the ``demo`` / ``demo:<task>`` presets (generated from the run's seed)
register_source("builtin", SourceKind("built-in demo task", generate=builtin_records))
register_preset_group("demo", tuple(DEMO_TASKS),
                      lambda root, names, seed: demo_specs(seed=0 if seed is None else seed, names=names))
