"""Where a task's records come from: the data root and a registry of source kinds.

A task spec's ``source`` is one of:

* ``<prefix>:<name>`` for a registered prefix: ``hf:<dataset>`` (``datasets.load_dataset``) and
  ``builtin:<task>`` (generated demo tasks, registered by :mod:`mtpeft.data.builtin`); more with
  :func:`register_source`;
* a local record file (``.json``, ``.jsonl``, ``.csv``, ``.tsv``, ``.parquet``) or a folder written by
  ``datasets``' ``save_to_disk`` (relative paths resolve as :func:`resolve_source` says);
* any other local folder or name: a Hugging Face dataset (a local dataset repository, or a Hub name).

The data root (the folder relative sources and presets resolve against) is configuration: ``data.root`` in a run
config, or ``$MTPEFT_DATA_ROOT``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .loaders import DataFormatError, Record, is_record_file, read_located_records

if TYPE_CHECKING:
    from .spec import TaskSpec

__all__ = [
    "DATA_ROOT_ENV",
    "SourceKind",
    "default_data_root",
    "find_data_root",
    "locate_source",
    "register_source",
    "resolve_source",
]

#: The environment variable that names the data root when a run config does not (``data.root``).
DATA_ROOT_ENV = "MTPEFT_DATA_ROOT"


def default_data_root() -> Path | None:
    """The folder relative task sources resolve against when none is given: ``$MTPEFT_DATA_ROOT``, or None
    (then relative sources resolve against the working directory only)."""
    env = os.environ.get(DATA_ROOT_ENV)
    return Path(env).expanduser() if env else None


def find_data_root() -> Path | None:
    """:func:`default_data_root` if that folder exists, else None (for tests that skip without data)."""
    root = default_data_root()
    return root if root is not None and root.is_dir() else None


# ------------------------------------------------------------------------------------------ kinds

#: ``read(spec, location, split)``: the records of one split of a source.
RecordReader = Callable[["TaskSpec", str, str], list[Record]]
#: ``generate(spec, location)``: the train and eval records of a source that makes its own disjoint split.
SplitGenerator = Callable[["TaskSpec", str], tuple[list[Record], list[Record]]]


@dataclass(frozen=True)
class SourceKind:
    """One kind of task source: it reads the records of a split (``read``), or, for a generated source,
    makes its own disjoint train and eval records (``generate``; ``max_train``/``max_eval`` are then counts)."""

    name: str
    read: RecordReader | None = None
    generate: SplitGenerator | None = None

    def __post_init__(self) -> None:
        if (self.read is None) == (self.generate is None):
            raise ValueError(f"source kind {self.name!r} must give exactly one of read and generate")


_PREFIXED: dict[str, SourceKind] = {}


def register_source(prefix: str, kind: SourceKind) -> SourceKind:
    """Make ``<prefix>:<location>`` sources read by ``kind``; returns ``kind``."""
    if not prefix.isidentifier():
        raise ValueError(f"a source prefix must be a plain word, got {prefix!r}")
    if prefix in _PREFIXED:
        raise ValueError(f"a source kind is already registered under the prefix {prefix!r}")
    _PREFIXED[prefix] = kind
    return kind


def _prefixed(source: str) -> tuple[SourceKind, str] | None:
    prefix, sep, location = source.partition(":")
    return (_PREFIXED[prefix], location) if sep and prefix in _PREFIXED else None


def resolve_source(source: str, data_root: str | Path | None = None) -> Path | None:
    """Resolve a local source path, or return None when ``source`` is not local (a registered prefix such as
    ``hf:``/``builtin:``, or a Hugging Face dataset name).

    Absolute paths are kept. Relative paths resolve against ``data_root`` when given; otherwise against
    the working directory, then :func:`default_data_root` when one is set. A source with a
    data-file suffix (``.json``...) is always local.

    Raises:
        FileNotFoundError: a local-looking source does not exist (the message lists the paths tried).
    """
    if _prefixed(source) is not None:
        return None
    p = Path(source).expanduser()
    if p.is_absolute():
        candidates = [p]
    elif data_root is not None:
        candidates = [Path(data_root).expanduser() / p]
    else:
        root = default_data_root()
        candidates = [Path.cwd() / p, *([root / p] if root is not None else [])]
    for c in candidates:
        if c.exists():
            return c
    if is_record_file(p) or p.is_absolute() or source.startswith((".", "~")):
        tried = ", ".join(str(c) for c in candidates)
        hint = "" if data_root is not None else f" (set data_root or ${DATA_ROOT_ENV})"
        raise FileNotFoundError(f"data file {source!r} not found; tried {tried}{hint}")
    return None


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def locate_source(source: str, data_root: str | Path | None = None) -> tuple[SourceKind, str]:
    """The kind of ``source`` and the location its reader takes: the text after a registered prefix, a resolved
    local path, or a Hugging Face dataset name (see the module docstring)."""
    found = _prefixed(source)
    if found is not None:
        return found
    path = resolve_source(source, data_root)
    if path is None:
        return HUB, source
    if path.is_dir():
        return (SAVED if is_saved_dataset(path) else HUB), str(path)
    return FILES, str(path)


# ---------------------------------------------------------------------------------------- readers


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise DataFormatError("loading a Hugging Face dataset needs the datasets package") from exc
    return datasets


def _rows(rows: Any, where: str) -> list[Record]:
    return [Record(dict(row), where, i + 1, i, "row") for i, row in enumerate(rows)]


def _read_hub(spec: TaskSpec, name: str, split: str) -> list[Record]:
    if Path(name).expanduser().is_dir() and is_saved_dataset(Path(name).expanduser()):
        # ``hf:<a save_to_disk folder>``: load_dataset refuses these in older datasets ("use load_from_disk")
        return _read_saved(spec, str(Path(name).expanduser()), split)
    datasets = _datasets()
    try:
        ds = datasets.load_dataset(name, spec.subset, split=split)
    except Exception as exc:
        raise DataFormatError(
            f"cannot load Hugging Face dataset {name!r} (subset={spec.subset!r}, split={split!r}): {exc}"
        ) from exc
    return _rows(ds, f"hf:{name}" + (f"/{spec.subset}" if spec.subset else "") + f"[{split}]")


def _read_saved(spec: TaskSpec, folder: str, split: str) -> list[Record]:
    datasets = _datasets()
    try:
        saved = datasets.load_from_disk(folder)
    except Exception as exc:
        raise DataFormatError(f"cannot load the saved dataset {folder}: {exc}") from exc
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise DataFormatError(f"saved dataset {folder} has no split {split!r}; its splits: {sorted(saved)}")
        saved = saved[split]
    elif split != "train" and str(saved.split or "train") != split:
        raise DataFormatError(f"saved dataset {folder} holds one split ({saved.split or 'unnamed'}), not "
                              f"{split!r}; split it with test_size, or save a DatasetDict")
    return _rows(saved, f"{folder}[{split}]")


def _read_file(spec: TaskSpec, path: str, split: str) -> list[Record]:
    return read_located_records(Path(path), columns=spec.columns, header=spec.tsv_header, split=split)


FILES = SourceKind("record file", read=_read_file)
SAVED = SourceKind("saved dataset", read=_read_saved)
HUB = register_source("hf", SourceKind("Hugging Face dataset", read=_read_hub))
