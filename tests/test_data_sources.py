"""Task sources: the data root is configuration, the source registry, saved datasets, one resolution entry point."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_jsonl

import mtpeft.data.sources as sources
from mtpeft.data.loaders import DataFormatError, Record
from mtpeft.data.resolve import resolve_task_specs
from mtpeft.data.sources import (
    DATA_ROOT_ENV,
    SourceKind,
    default_data_root,
    locate_source,
    register_source,
    resolve_source,
)
from mtpeft.data.tasks import TaskSpec, load_task
from mtpeft.training.run_config import run_config_from_dict

ROWS = [{"input": f"q{i}", "target": f"a{i}"} for i in range(6)]


def test_the_data_root_comes_from_configuration_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_data_root() is None  # never a folder above the checkout
    with pytest.raises(FileNotFoundError) as info:
        resolve_source("qa.jsonl")
    assert f"tried {tmp_path / 'qa.jsonl'} (set data_root or ${DATA_ROOT_ENV})" in str(info.value)
    root = tmp_path / "root"
    root.mkdir()
    write_jsonl(root / "qa.jsonl", ROWS)
    monkeypatch.setenv(DATA_ROOT_ENV, str(root))
    assert default_data_root() == root and resolve_source("qa.jsonl") == root / "qa.jsonl"
    with pytest.raises(FileNotFoundError, match="not found; tried .*other/qa.jsonl$"):
        resolve_source("qa.jsonl", tmp_path / "other")  # a given data root is the only place looked in


def test_source_kinds_by_prefix_path_and_name(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "qa.jsonl", ROWS)
    assert locate_source("qa.jsonl", tmp_path) == (sources.FILES, str(tmp_path / "qa.jsonl"))
    assert locate_source("hf:org/set") == (sources.HUB, "org/set")
    assert locate_source("org/set") == (sources.HUB, "org/set")
    kind, location = locate_source("builtin:arithmetic")
    assert kind.generate is not None and location == "arithmetic"
    assert resolve_source("builtin:arithmetic") is None and resolve_source("hf:org/set") is None


def test_a_registered_source_kind_reads_its_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "_PREFIXED", dict(sources._PREFIXED))
    seen = []

    def read(spec: TaskSpec, location: str, split: str) -> list[Record]:
        seen.append((location, split))
        return [Record(r, f"mem:{location}", i + 1, i, "row") for i, r in enumerate(ROWS)]

    register_source("mem", SourceKind("in-memory rows", read=read))
    with pytest.raises(ValueError, match="already registered under the prefix 'mem'"):
        register_source("mem", SourceKind("again", read=read))
    data = load_task(TaskSpec(name="qa", source="mem:rows", test_size=2))
    assert seen == [("rows", "train")] and (len(data.train), len(data.eval)) == (4, 2)
    assert data.train[0].meta["source"] == "mem:rows"


def test_a_generated_source_is_not_an_eval_source(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "qa.jsonl", ROWS)
    spec = TaskSpec(name="qa", source="qa.jsonl", eval_source="builtin:arithmetic")
    with pytest.raises(DataFormatError, match="makes its own train/eval split"):
        load_task(spec, tmp_path)


@pytest.mark.parametrize("as_dict", [False, True])
def test_a_save_to_disk_folder_is_a_source(tmp_path: Path, as_dict: bool) -> None:
    datasets = pytest.importorskip("datasets")
    train = datasets.Dataset.from_list(ROWS)
    folder = tmp_path / "saved"
    if as_dict:
        datasets.DatasetDict({"train": train, "test": datasets.Dataset.from_list(ROWS[:2])}).save_to_disk(folder)
        spec = TaskSpec(name="qa", source="saved", eval_split="test")
    else:
        train.save_to_disk(folder)
        spec = TaskSpec(name="qa", source="saved", test_size=2)
    assert locate_source("saved", tmp_path)[0] is sources.SAVED
    data = load_task(spec, tmp_path)
    assert (len(data.train), len(data.eval)) == ((6, 2) if as_dict else (4, 2))
    assert data.train[0].meta["source"] == f"{folder}[train]"
    if as_dict:
        with pytest.raises(DataFormatError, match=r"has no split 'dev'; its splits: \['test', 'train'\]"):
            load_task(TaskSpec(name="qa", source="saved", eval_split="dev"), tmp_path)
    else:
        with pytest.raises(DataFormatError, match="holds one split"):
            load_task(TaskSpec(name="qa", source="saved", eval_split="dev"), tmp_path)


def test_an_hf_prefixed_save_to_disk_folder_is_read_as_a_saved_dataset(tmp_path: Path) -> None:
    # datasets' load_dataset refuses such folders in the versions mtpeft supports (3.x: "use load_from_disk")
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:2])}
                         ).save_to_disk(folder)
    data = load_task(TaskSpec(name="qa", source=f"hf:{folder}", eval_split="test"))
    assert (len(data.train), len(data.eval)) == (6, 2)
    assert data.train[0].meta["source"] == f"{folder}[train]"


def test_run_task_entries_resolve_in_one_place(tmp_path: Path) -> None:
    cfg = run_config_from_dict({"tasks": ["demo:arithmetic,reverse", {"name": "qa", "source": "qa.jsonl"}],
                                "data": {"root": str(tmp_path), "max_train_per_task": 5}, "train": {"seed": 7}})
    specs = resolve_task_specs(cfg)
    assert [s.name for s in specs] == ["arithmetic", "reverse", "qa"]
    assert [s.seed for s in specs] == [7, 7, 0]  # generated tasks follow the run's seed
    assert all(s.max_train == 5 for s in specs)
    with pytest.raises(ValueError, match=r"unknown task 'nope' in preset group 'demo'"):
        resolve_task_specs(run_config_from_dict({"tasks": ["demo:arithmetic,nope"]}))
    with pytest.raises(ValueError, match=r"duplicate task names in the run config: \['arithmetic'\]"):
        resolve_task_specs(run_config_from_dict({"tasks": ["demo:arithmetic", "demo"]}))
