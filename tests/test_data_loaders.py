"""Record file readers: formats, located errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtpeft.data.loaders import DataFormatError, read_located_records, read_records


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_json_list_and_lines(tmp_path: Path) -> None:
    p = write(
        tmp_path / "a.json", '[\n  {"input": "x", "target": "1"},\n\n  {"input": "y", "target": "2"}\n]\n'
    )
    recs = read_located_records(p)
    assert [r.data["input"] for r in recs] == ["x", "y"]
    assert [r.line for r in recs] == [2, 4]
    assert read_records(p) == [{"input": "x", "target": "1"}, {"input": "y", "target": "2"}]


def test_json_object_with_single_list_like_bbh(tmp_path: Path) -> None:
    doc = {"canary": "do not train", "examples": [{"input": "a", "target": "b"}] * 3}
    p = write(tmp_path / "bbh.json", json.dumps(doc, indent=1))
    recs = read_located_records(p)
    assert len(recs) == 3 and recs[0].data == {"input": "a", "target": "b"}
    assert recs[0].line > 1  # located inside the object, not at line 1


def test_json_object_with_split_lists(tmp_path: Path) -> None:
    p = write(tmp_path / "s.json", json.dumps({"train": [{"a": 1}], "test": [{"a": 2}, {"a": 3}]}))
    assert read_records(p, split="test") == [{"a": 2}, {"a": 3}]
    with pytest.raises(DataFormatError, match=r"several lists \['train', 'test'\]"):
        read_records(p, split="validation")


def test_json_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    p = write(tmp_path / "bad.json", '[\n {"a": 1},\n {"a": 2,,}\n]')
    with pytest.raises(DataFormatError) as ei:
        read_records(p)
    msg = str(ei.value)
    assert str(p) in msg and "line 3" in msg and "column" in msg


def test_json_non_object_record(tmp_path: Path) -> None:
    p = write(tmp_path / "x.json", '[{"a": 1},\n 5]')
    with pytest.raises(DataFormatError, match=r"line 2 column 2: record 1 is a JSON int"):
        read_records(p)


def test_jsonl_and_malformed_line(tmp_path: Path) -> None:
    good = write(tmp_path / "g.jsonl", '{"a": 1}\n\n{"a": 2}\n')
    recs = read_located_records(good)
    assert [(r.data["a"], r.line) for r in recs] == [(1, 1), (2, 3)]
    bad = write(tmp_path / "b.jsonl", '{"a": 1}\n{"a": 2}\n{"a": 3\n{"a": 4}\n')
    with pytest.raises(DataFormatError) as ei:
        read_records(bad)
    assert f"{bad} line 3" in str(ei.value)
    arr = write(tmp_path / "c.jsonl", '{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataFormatError, match="line 2: expected a JSON object"):
        read_records(arr)


def test_tsv_quote_none_like_glue(tmp_path: Path) -> None:
    # GLUE TSVs contain unbalanced double quotes; standard CSV quoting would merge rows.
    p = write(tmp_path / "t.tsv", 'sentence\tlabel\nhe said " hi\t1\nshe said " bye "\t0\n')
    assert read_records(p) == [
        {"sentence": 'he said " hi', "label": "1"},
        {"sentence": 'she said " bye "', "label": "0"},
    ]


def test_tsv_wrong_field_count_names_line(tmp_path: Path) -> None:
    p = write(tmp_path / "t.tsv", "a\tb\n1\t2\n3\t4\n5\n6\t7\n")
    with pytest.raises(DataFormatError) as ei:
        read_records(p)
    msg = str(ei.value)
    assert f"{p} line 4" in msg and "expected 2" in msg and "got 1" in msg


def test_tsv_columns_without_header_and_bom(tmp_path: Path) -> None:
    p = write(tmp_path / "cola.tsv", "gj04\t1\t\tGood sentence.\ngj04\t0\t*\tBad sentence.\n")
    recs = read_records(p, columns=["source", "label", "orig", "sentence"])
    assert recs[1] == {"source": "gj04", "label": "0", "orig": "*", "sentence": "Bad sentence."}
    # header=True with columns: skip the file's header, use the given names
    h = write(tmp_path / "h.tsv", "\ufeffQuality\t#1 String\n1\tx\n")
    assert read_records(h) == [{"Quality": "1", "#1 String": "x"}]  # BOM stripped
    assert read_records(h, columns=["q", "s"], header=True) == [{"q": "1", "s": "x"}]


def test_csv_quoted_multiline(tmp_path: Path) -> None:
    p = write(tmp_path / "c.csv", 'q,a\n"line one\nline two",1\nplain,2\n')
    recs = read_located_records(p)
    assert recs[0].data == {"q": "line one\nline two", "a": "1"}
    assert [r.line for r in recs] == [2, 4]
    bad = write(tmp_path / "bad.csv", "q,a\nx,1,extra\n")
    with pytest.raises(DataFormatError, match=r"line 2: expected 2 comma-separated fields"):
        read_records(bad)


def test_non_utf8_bytes_name_line(tmp_path: Path) -> None:
    p = write(tmp_path / "latin.jsonl", b'{"a": "ok"}\n{"a": "caf' + b"\xe9" + b'"}\n')
    with pytest.raises(DataFormatError) as ei:
        read_records(p)
    msg = str(ei.value)
    assert f"{p} line 2" in msg and "UTF-8" in msg


def test_empty_and_missing_and_unsupported(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="file is empty"):
        read_records(write(tmp_path / "e.jsonl", "\n  \n"))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_records(tmp_path / "nope.json")
    with pytest.raises(DataFormatError, match="unsupported file type '.txt'"):
        read_records(write(tmp_path / "x.txt", "hi"))


def test_parquet_roundtrip(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"input": ["a", "b"], "target": ["1", "2"]}), p)
    recs = read_located_records(p)
    assert [r.data for r in recs] == [{"input": "a", "target": "1"}, {"input": "b", "target": "2"}]
    assert recs[1].where() == f"{p} row 2"
